//! gatekeeper behind a real Traefik 3.7 (`tests/common/traefik.rs`): the file provider on a
//! watched directory, the HTTP provider, the Redis KV provider, mTLS + a mirroring service built
//! from the deploy/ files, forward-auth to `/share/{source}` and `/allow/{service}`, the legacy
//! `dynamic-whitelist@file` drop-in, two replicas on one Redis, the middleware names `check` and
//! `labels` print, and the forwardAuth snippet `labels` prints. Every request is a real socket
//! from a chosen loopback address through Traefik; what Traefik loaded is read from its API; a
//! WRN or ERR line in its log fails the test.
//!
//! Nothing here bounds how long anything takes (machines are noisy): "the next request passes"
//! is exactly one request sent right after the answer, and every other wait is generous.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::proxies::{Certs, deploy_dir, immich_key, tool};
use common::redis::Redis;
use common::traefik::{
    Traefik, labels_to_dynamic, merge, redis_with_notifications, send_from, web_with,
};
use common::upstream::{Mode, StandIn, allow_status, yaml_to_json};
use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "traefik-tests-admin-token";

/// The protected app's host (Immich).
const PHOTOS: &str = "photos.test";
/// A service nobody may reach (the deny-all sentinel).
const JELLY: &str = "jelly.test";
/// A router protected by forward-auth to `/allow/immich`.
const ALLOW: &str = "allow.test";

/// Granted through the admin API.
const FRIEND: &str = "127.0.0.23";
/// Never granted.
const STRANGER: &str = "127.0.0.24";
/// Inside Immich's `always_allow`: must always get 200.
const WITNESS: &str = "127.0.0.50";
/// Tries a link the app does not know.
const GUESSER: &str = "127.0.2.1";

/// Where Traefik reads gatekeeper's lists from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    File,
    Http,
    Redis,
}

impl Provider {
    /// The `@provider` suffix of the middlewares Traefik reads from it.
    fn suffix(self) -> &'static str {
        match self {
            Provider::File => "file",
            Provider::Http => "http",
            Provider::Redis => "redis",
        }
    }

    /// The `traefik:` mapping of a policy serving the lists through this provider only.
    /// The `traefik:` settings. `settle` (how long Traefik takes to apply a configuration its
    /// throttle let through) is raised from its 150 ms default: these Traefiks log at DEBUG,
    /// which marshals the whole configuration on every change, on a CI machine running other
    /// tests at once; the benchmark (scripts/traefik-bench) measures the default at INFO.
    fn policy(self, traefik: &Traefik, redis: Option<&Redis>) -> String {
        match self {
            Provider::File => format!(
                "{{ file: \"{}\", settle: {SETTLE} }}",
                traefik.dynamic().join("gatekeeper.yml").display()
            ),
            // The HTTP provider reads /traefik/dynamic.json, always served: no file, no KV.
            Provider::Http => format!("{{ settle: {SETTLE} }}"),
            Provider::Redis => format!(
                "{{ redis: {{ url: \"{}\" }}, settle: {SETTLE} }}",
                redis.expect("a Redis for the KV provider").url()
            ),
        }
    }

    /// Traefik's `providers`: this one, plus the file provider on `dynamic/` for the routers.
    fn traefik(self, traefik: &Traefik, gatekeeper: SocketAddr, redis: Option<&Redis>) -> Value {
        let mut providers = json!({
            "file": { "directory": traefik.dynamic(), "watch": true }
        });
        match self {
            Provider::File => {}
            Provider::Http => merge(
                &mut providers,
                json!({ "http": {
                    "endpoint": format!("http://{gatekeeper}/traefik/dynamic.json"),
                    "pollInterval": "1s"
                }}),
            ),
            Provider::Redis => merge(
                &mut providers,
                json!({ "redis": {
                    "endpoints": [format!("127.0.0.1:{}", redis.expect("a Redis").port())]
                }}),
            ),
        }
        providers
    }
}

// ---------------------------------------------------------------------------------------------
// gatekeeper
// ---------------------------------------------------------------------------------------------

/// A gatekeeper in its own temp dir, admin API on with [`TOKEN`]. Dropped after Traefik when
/// declared before it.
struct Gatekeeper {
    daemon: Daemon,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Gatekeeper {
    /// Run `policy` (written as `gatekeeper.yaml`) with `env` on top of the token.
    fn start(policy: &str, env: &[(&str, &str)]) -> Gatekeeper {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("gatekeeper.yaml"), policy).expect("write policy");
        Self::start_in(dir, &["--config", "gatekeeper.yaml"], env)
    }

    fn start_in(dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Gatekeeper {
        let mut all = vec![("GATEKEEPER_ADMIN__TOKEN", TOKEN)];
        all.extend_from_slice(env);
        let daemon = Daemon::start(dir.path(), args, &all);
        let admin = daemon.admin_addr();
        Gatekeeper { daemon, admin, dir }
    }

    fn url(&self) -> String {
        format!("http://{}", self.daemon.addr)
    }

    fn api(&self, method: &str, target: &str, body: &str) -> Reply {
        let bearer = format!("Bearer {TOKEN}");
        http(
            self.admin,
            method,
            target,
            &[("Authorization", &bearer)],
            body,
        )
    }

    /// Grant `address` through `source` (201 expected).
    fn grant(&self, source: &str, address: &str) {
        let body = json!({ "source": source, "address": address }).to_string();
        let r = self.api("POST", "/api/v1/entries", &body);
        assert_eq!(
            r.status,
            201,
            "grant {address}: {r:?}\n{}",
            self.daemon.log()
        );
    }

    /// Revoke `address` everywhere (200 expected).
    fn revoke(&self, address: &str) {
        let r = self.api("DELETE", &format!("/api/v1/entries/{address}"), "");
        assert_eq!(r.status, 200, "revoke {address}: {r:?}");
    }

    /// The networks of the ledger's entries.
    fn granted(&self) -> Vec<String> {
        let r = self.api("GET", "/api/v1/entries", "");
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["network"].as_str().unwrap().to_string())
            .collect()
    }
}

/// `traefik.settle` in these tests (see [`Provider::policy`]).
const SETTLE: &str = "500ms";

/// A policy trusting only Traefik (127.0.0.1), with Immich (always allowing [`WITNESS`]),
/// Jellyfin (nobody), a mirror source `ha` and a share source `immich-share` checked against
/// `upstream`.
fn policy(traefik: &str, upstream: &str) -> String {
    format!(
        r#"listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
state_file: ./data/state.json
trusted_proxies: [127.0.0.1/32]
traefik: {traefik}
services:
  immich: {{ always_allow: ["{WITNESS}/32"] }}
  jellyfin: {{}}
sources:
  ha: {{ kind: mirror, hosts: [ha.test], unlocks: [immich], max_ips: 50, idle_ttl: 1h }}
  immich-share:
    kind: share
    upstream: {upstream}
    patterns:
      - path: '^/share/(?P<key>[A-Za-z0-9_-]{{67}})$'
        check: '/api/shared-links/me?key={{key}}'
    unlocks: [immich]
    max_ips: 50
    idle_ttl: 1h
"#
    )
}

/// The key of viewer `i`'s share link.
fn key(i: usize) -> String {
    immich_key(&format!("viewer{i}"))
}

/// Run `gatekeeper ARGS` on the policy in `dir`; stdout, panicking on a failure.
fn run_ok(dir: &Path, args: &[&str]) -> String {
    let (status, out, err) = run(dir, args, &[]);
    assert!(
        status.success(),
        "gatekeeper {args:?}: {status}\n{out}{err}"
    );
    out
}

/// The Docker labels `gatekeeper labels --proxy traefik` prints (`- "traefik....=..."` lines).
fn printed_labels(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|l| l.starts_with("traefik."))
        .map(str::to_string)
        .collect()
}

/// `labels --proxy traefik` for the policy in `dir`, gatekeeper at `url`.
fn labels(dir: &Path, url: &str) -> String {
    run_ok(
        dir,
        &[
            "labels",
            "--config",
            "gatekeeper.yaml",
            "--url",
            url,
            "--proxy",
            "traefik",
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// A stack: an app, gatekeeper, Traefik reading the lists through one provider
// ---------------------------------------------------------------------------------------------

/// Traefik (dropped first), gatekeeper, the app (a stand-in Immich knowing 20 share keys) and
/// Redis when the provider needs one.
struct Stack {
    traefik: Traefik,
    gk: Gatekeeper,
    app: StandIn,
    _redis: Option<Redis>,
    provider: Provider,
}

impl Stack {
    /// Everything running, the routers loaded: `immich` (Host [`PHOTOS`], the provider's
    /// `gatekeeper-immich`), `jellyfin` (Host [`JELLY`], `gatekeeper-jellyfin`), `immich-allow`
    /// (Host [`ALLOW`], forwardAuth to `/allow/immich`), plus `extra` dynamic configuration (built
    /// with gatekeeper's URL and its policy dir).
    fn start(provider: Provider, extra: impl Fn(&Gatekeeper) -> Value) -> Stack {
        let keys: Vec<String> = (1..=20).map(key).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let app = StandIn::immich(&keys, &[], Mode::Answer);
        let redis = (provider == Provider::Redis).then(redis_with_notifications);
        let traefik = Traefik::new();
        let gk = Gatekeeper::start(
            &policy(&provider.policy(&traefik, redis.as_ref()), &app.origin()),
            &[],
        );
        let providers = provider.traefik(&traefik, gk.daemon.addr, redis.as_ref());
        let traefik = traefik.start(web_with(providers));
        let stack = Stack {
            traefik,
            gk,
            app,
            _redis: redis,
            provider,
        };
        // The lists first, then the routers that use them: a router that references a
        // middleware not loaded yet is an ERR line.
        stack.traefik.wait_source_range(
            &stack.mw("immich"),
            "only the always-allowed witness",
            |l| l == [format!("{WITNESS}/32")],
        );
        let mut dynamic = stack.routers();
        merge(&mut dynamic, extra(&stack.gk));
        stack
            .traefik
            .write_dynamic("routers.yml", &dynamic.to_string());
        for router in ["immich", "jellyfin", "immich-allow"] {
            stack.traefik.wait_router(&format!("{router}@file"));
        }
        stack
    }

    /// `gatekeeper-{service}@{provider}`.
    fn mw(&self, service: &str) -> String {
        format!("gatekeeper-{service}@{}", self.provider.suffix())
    }

    fn routers(&self) -> Value {
        json!({ "http": {
            "routers": {
                "immich": {
                    "rule": format!("Host(`{PHOTOS}`)"), "entryPoints": ["web"],
                    "middlewares": [self.mw("immich")], "service": "app"
                },
                "jellyfin": {
                    "rule": format!("Host(`{JELLY}`)"), "entryPoints": ["web"],
                    "middlewares": [self.mw("jellyfin")], "service": "app"
                },
                "immich-allow": {
                    "rule": format!("Host(`{ALLOW}`)"), "entryPoints": ["web"],
                    "middlewares": ["allow-immich"], "service": "app"
                }
            },
            "middlewares": {
                // Written by the tests (no snippet prints it): explicit about what Traefik 3.7
                // warns about when unset.
                "allow-immich": { "forwardAuth": {
                    "address": format!("{}/allow/immich", self.gk.url()),
                    "trustForwardHeader": false,
                    "maxResponseBodySize": 4096
                }}
            },
            "services": {
                "app": { "loadBalancer": { "servers": [{ "url": self.app.origin() }] } }
            }
        }})
    }

    fn status(&self, host: &str, path: &str, client: &str) -> u16 {
        self.traefik.status("web", host, path, client)
    }

    /// Grant `client` through the admin API, wait until Traefik's middleware lists it, and
    /// check it reaches Immich while the stranger does not.
    fn grant_and_check(&self, client: &str) {
        let network = format!("{client}/32");
        assert_eq!(self.status(PHOTOS, "/", client), 403, "before the grant");
        self.gk.grant("ha", client);
        self.traefik
            .wait_middleware_lists(&self.mw("immich"), &network);
        assert_eq!(self.status(PHOTOS, "/photos/1", client), 200, "granted");
        assert_eq!(self.status(PHOTOS, "/", STRANGER), 403, "stranger");
        // Through forward-auth to /allow/immich as well, at once.
        assert_eq!(self.status(ALLOW, "/", client), 200, "/allow, granted");
        assert_eq!(self.status(ALLOW, "/", STRANGER), 403, "/allow, stranger");
    }

    /// Revoke `client`, wait until Traefik's middleware no longer lists it, check it is refused.
    fn revoke_and_check(&self, client: &str) {
        self.gk.revoke(client);
        assert_eq!(self.status(ALLOW, "/", client), 403, "/allow, revoked");
        self.traefik
            .wait_middleware_lacks(&self.mw("immich"), &format!("{client}/32"));
        assert_eq!(self.status(PHOTOS, "/", client), 403, "revoked");
    }

    /// The deny-all sentinel: Jellyfin's middleware is loaded and admits nobody; its router
    /// answers 403 (not 404) to everyone, the witness included.
    fn check_sentinel(&self) {
        assert_eq!(
            self.traefik.source_range(&self.mw("jellyfin")),
            Some(vec!["0.0.0.0/32".to_string()]),
            "{}",
            self.traefik.middlewares()
        );
        for client in [FRIEND, STRANGER, WITNESS] {
            assert_eq!(
                self.status(JELLY, "/", client),
                403,
                "jellyfin for {client}"
            );
        }
    }
}

/// A client polling a protected router until stopped, recording every status.
struct Witness {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<u16>>>,
}

impl Witness {
    fn start(traefik: &Traefik, host: &'static str, client: &'static str) -> Witness {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = traefik.entrypoint("web");
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            while !flag.load(Ordering::SeqCst) {
                seen.push(send_from(client, addr, request.as_bytes()).map_or(0, |r| r.status));
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        Witness {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop; every status seen.
    fn finish(mut self) -> Vec<u16> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().expect("witness thread")
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// 1, 2, 3, 10: grant, revoke, sentinel, through each provider
// ---------------------------------------------------------------------------------------------

fn grant_revoke_sentinel(provider: Provider) {
    let stack = Stack::start(provider, |_| json!({}));
    let witness = Witness::start(&stack.traefik, PHOTOS, WITNESS);
    stack.check_sentinel();
    stack.grant_and_check(FRIEND);
    // A second client while the first stays: both listed.
    stack.grant_and_check("127.0.0.25");
    stack.revoke_and_check(FRIEND);
    assert_eq!(stack.status(PHOTOS, "/", "127.0.0.25"), 200);
    stack.check_sentinel();
    let seen = witness.finish();
    assert!(!seen.is_empty());
    let bad: Vec<&u16> = seen.iter().filter(|s| **s != 200).collect();
    assert!(
        bad.is_empty(),
        "the always-allowed witness got {} answers other than 200 of {} (an outage): {bad:?}",
        bad.len(),
        seen.len()
    );
    stack.traefik.assert_no_problems();
}

#[test]
fn file_provider_grant_revoke_sentinel_and_the_witness_never_sees_an_outage() {
    grant_revoke_sentinel(Provider::File);
}

#[test]
fn http_provider_grant_revoke_and_sentinel() {
    grant_revoke_sentinel(Provider::Http);
}

#[test]
fn redis_kv_provider_grant_revoke_and_sentinel() {
    grant_revoke_sentinel(Provider::Redis);
}

// ---------------------------------------------------------------------------------------------
// 5, 9: share links through forwardAuth, as `gatekeeper labels` prints it
// ---------------------------------------------------------------------------------------------

/// The share router and its forwardAuth middleware from `gatekeeper labels`, for Immich at
/// [`PHOTOS`], served by the app.
fn share_router_from_labels(gk: &Gatekeeper) -> Value {
    let printed = labels(gk.dir.path(), &gk.url());
    let labels: Vec<String> = printed_labels(&printed)
        .into_iter()
        .filter(|l| l.contains("<share router>") || l.starts_with("traefik.http.middlewares."))
        .map(|l| {
            l.replace("<share router>", "immich-link")
                .replace("<app host>", PHOTOS)
        })
        .collect();
    assert!(
        labels.iter().any(|l| l.contains(".forwardauth.address=")),
        "no forwardauth label in:\n{printed}"
    );
    let mut dynamic = labels_to_dynamic(&labels, &BTreeMap::new());
    merge(
        &mut dynamic,
        json!({ "http": { "routers": { "immich-link": { "service": "app", "entryPoints": ["web"] } } } }),
    );
    dynamic
}

/// 20 viewers (127.0.1.1 ... 127.0.1.20), each with a valid link: the link is answered 200 and
/// the viewer's next request to Immich's main router passes; a made-up link is 403 and grants
/// nothing.
fn share_links(provider: Provider) {
    let stack = Stack::start(provider, share_router_from_labels);
    stack.traefik.wait_router("immich-link@file");
    let witness = Witness::start(&stack.traefik, PHOTOS, WITNESS);
    let mut failures = Vec::new();
    for i in 1..=20 {
        let viewer = format!("127.0.1.{i}");
        let asked = Instant::now();
        let link = stack
            .traefik
            .get("web", PHOTOS, &format!("/share/{}", key(i)), &viewer);
        let answered = asked.elapsed();
        assert_eq!(link.status, 200, "viewer {viewer}'s link: {link:?}");
        // Exactly one request, right after the answer.
        let next = stack.status(PHOTOS, "/photos/1", &viewer);
        if next != 200 {
            // For the message only: how much later it would have passed.
            let later = wait_for(&format!("{viewer} to pass at all"), SOON, || {
                match stack.status(PHOTOS, "/photos/1", &viewer) {
                    200 => Ok(asked.elapsed()),
                    s => Err(s.to_string()),
                }
            });
            failures.push(format!(
                "{viewer}: link answered after {answered:?}, next request {next}, \
                 first 200 {later:?} after the link was asked"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{provider:?} provider: {} of 20 viewers' next request after a 200 share link did not \
         pass:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let seen = witness.finish();
    assert!(
        seen.iter().all(|s| *s == 200),
        "the always-allowed witness saw {:?}",
        seen.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );
    let made_up = stack.traefik.get(
        "web",
        PHOTOS,
        &format!("/share/{}", immich_key("madeup")),
        GUESSER,
    );
    assert_eq!(made_up.status, 403, "{made_up:?}");
    assert_eq!(stack.status(PHOTOS, "/", GUESSER), 403);
    assert!(!stack.gk.granted().contains(&format!("{GUESSER}/32")));
    // A viewer claiming another address in X-Forwarded-For: Traefik's entrypoint does not trust
    // it, so the forwardAuth request carries the real one, which is what is granted.
    let spoofer = "127.0.2.2";
    let link = stack.traefik.request(
        "web",
        spoofer,
        "GET",
        PHOTOS,
        &format!("/share/{}", key(1)),
        &[("X-Forwarded-For", "127.0.0.99")],
    );
    assert_eq!(link.status, 200, "{link:?}");
    let granted = stack.gk.granted();
    assert!(
        granted.contains(&format!("{spoofer}/32")) && !granted.contains(&"127.0.0.99/32".into()),
        "{granted:?}"
    );
    stack.traefik.assert_no_problems();
}

#[test]
fn share_links_file_provider_20_viewers_next_request_passes() {
    share_links(Provider::File);
}

#[test]
fn share_links_http_provider_20_viewers_next_request_passes() {
    share_links(Provider::Http);
}

#[test]
fn share_links_redis_kv_provider_20_viewers_next_request_passes() {
    share_links(Provider::Redis);
}

#[test]
fn labels_forward_auth_snippet_loads_without_a_traefik_warning() {
    let traefik = Traefik::new();
    let app = StandIn::immich(&[&key(1)], &[], Mode::Answer);
    let gk = Gatekeeper::start(
        &policy(&Provider::File.policy(&traefik, None), &app.origin()),
        &[],
    );
    let providers = json!({ "file": { "directory": traefik.dynamic(), "watch": true } });
    let traefik = traefik.start(web_with(providers));
    traefik.wait_source_range("gatekeeper-immich@file", "loaded", |_| true);
    let mut dynamic = share_router_from_labels(&gk);
    merge(
        &mut dynamic,
        json!({ "http": { "services": {
            "app": { "loadBalancer": { "servers": [{ "url": app.origin() }] } }
        }}}),
    );
    traefik.write_dynamic("share.yml", &dynamic.to_string());
    traefik.wait_router("immich-link@file");
    let name = dynamic["http"]["middlewares"]
        .as_object()
        .and_then(|m| m.keys().next().cloned())
        .expect("a middleware from the labels");
    assert!(
        traefik.middleware(&format!("{name}@file")).is_some(),
        "{}",
        traefik.middlewares()
    );
    // The snippet works: a valid link passes.
    let link = traefik.get("web", PHOTOS, &format!("/share/{}", key(1)), "127.0.1.1");
    assert_eq!(link.status, 200, "{link:?}");
    traefik.assert_no_problems();
}

// ---------------------------------------------------------------------------------------------
// 4: mTLS + mirroring, from the deploy/ files
// ---------------------------------------------------------------------------------------------

/// The owner's phone, with the client certificate.
const PHONE: &str = "127.0.0.2";
/// Tries Home Assistant without a certificate.
const NO_CERT: &str = "127.0.0.4";
/// Has a certificate but claims to be someone else in X-Forwarded-For.
const SPOOFER: &str = "127.0.0.5";
/// Holds a valid Immich share link.
const VIEWER: &str = "127.0.0.6";

/// curl from `client` to `https://host:port/path` (resolved to 127.0.0.1), with a client
/// certificate when given; (status, curl's complaint). Status 0: no HTTP answer (a refused
/// handshake). The server certificate is Traefik's default one: `--insecure` (the client
/// certificate is what is under test).
fn curl(
    client: &str,
    host: &str,
    port: u16,
    path: &str,
    cert: Option<(&Path, &Path)>,
    headers: &[&str],
) -> (u16, String) {
    let mut cmd = Command::new(tool("curl", "apt-get install -y curl"));
    cmd.args([
        "-q",
        "--silent",
        "--show-error",
        "--insecure",
        "--max-time",
        "10",
    ])
    .args(["--noproxy", "*", "--interface", client])
    .arg("--resolve")
    .arg(format!("{host}:{port}:127.0.0.1"))
    .args(["--output", "/dev/null", "--write-out", "%{http_code}"]);
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    let out = cmd
        .arg(format!("https://{host}:{port}{path}"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    (
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// Every `traefik.*` label of every compose service but Traefik itself, with `http://gatekeeper:5000`
/// replaced by `gatekeeper`; routers without a `service` get their container's, as Docker does.
fn compose_labels(gatekeeper: &str, urls: &BTreeMap<String, String>) -> Value {
    let path = deploy_dir().join("compose.yaml");
    let text = std::fs::read_to_string(&path).expect("read deploy/compose.yaml");
    let compose = yaml_to_json(&text).expect("compose.yaml is YAML");
    let mut dynamic = json!({});
    for (name, service) in compose["services"].as_object().expect("services") {
        let Some(labels) = service["labels"].as_array() else {
            continue;
        };
        let labels: Vec<String> = labels
            .iter()
            .filter_map(Value::as_str)
            // Compose interpolation: `$$` is a literal `$`.
            .map(|l| {
                l.replace("$$", "$")
                    .replace("http://gatekeeper:5000", gatekeeper)
            })
            .collect();
        let mut part = labels_to_dynamic(&labels, urls);
        if let Some(routers) = part["http"]["routers"].as_object_mut() {
            for router in routers.values_mut() {
                if router.get("service").is_none() {
                    router["service"] = json!(name);
                    if part_needs_service(&labels, name) {
                        let url = urls
                            .get(name)
                            .unwrap_or_else(|| panic!("no address for compose service {name}"));
                        merge(
                            &mut dynamic,
                            json!({"http": {"services": {name: {"loadBalancer": {"servers": [{"url": url}]}}}}}),
                        );
                    }
                }
            }
        }
        merge(&mut dynamic, part);
    }
    dynamic
}

/// A container whose labels define no service of its own name (Docker makes one from its port).
fn part_needs_service(labels: &[String], name: &str) -> bool {
    !labels
        .iter()
        .any(|l| l.starts_with(&format!("traefik.http.services.{name}.")))
}

#[test]
fn deploy_files_mtls_mirroring_share_link_and_protected_routers() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(&dir.path().join("certs"));
    let deploy = deploy_dir();
    let read = |p: &str| {
        std::fs::read_to_string(deploy.join(p)).unwrap_or_else(|e| panic!("deploy/{p}: {e}"))
    };
    let ha = StandIn::start(Mode::Answer, |_| common::upstream::Reply {
        status: 200,
        content_type: "text/plain",
        body: "home assistant\n".into(),
        location: None,
    });
    let immich = StandIn::immich(&[&key(1)], &[], Mode::Answer);
    // Answers 200 on every path (the real Nextcloud's login page), like the Immich web app.
    let nextcloud = StandIn::immich(&[], &[], Mode::Answer);

    // Traefik's static configuration: deploy/traefik/traefik.yml, with loopback ports (the
    // harness), the file provider on the test's directory, and no Docker provider (there is no
    // Docker here: its routers come from compose.yaml's labels, translated, below).
    let traefik = Traefik::new();
    let mut config = yaml_to_json(&read("traefik/traefik.yml")).expect("traefik.yml is YAML");
    let providers = config["providers"].as_object_mut().expect("providers");
    assert!(providers.remove("docker").is_some(), "no docker provider");
    providers["file"]["directory"] = json!(traefik.dynamic());
    let traefik = traefik.start(config);

    // gatekeeper on deploy/gatekeeper.yaml, unchanged, with only addresses and paths
    // overridden by environment variables.
    let gk_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        gk_dir.path().join("gatekeeper.yaml"),
        read("gatekeeper.yaml"),
    )
    .unwrap();
    let file = traefik.dynamic().join("gatekeeper.yml");
    let api = format!("http://{}", traefik.api);
    let gk = Gatekeeper::start_in(
        gk_dir,
        &["--config", "gatekeeper.yaml"],
        &[
            ("GATEKEEPER_LISTEN", "127.0.0.1:0"),
            ("GATEKEEPER_ADMIN__LISTEN", "127.0.0.1:0"),
            ("GATEKEEPER_TRUSTED_PROXIES", "[127.0.0.1/32]"),
            ("GATEKEEPER_ALWAYS_ALLOW", "[]"),
            ("GATEKEEPER_TRAEFIK__FILE", file.to_str().unwrap()),
            ("GATEKEEPER_TRAEFIK__API", &api),
            (
                "GATEKEEPER_SOURCES__IMMICH-SHARE__UPSTREAM",
                &immich.origin(),
            ),
        ],
    );
    traefik.wait_source_range("gatekeeper-immich@file", "loaded", |_| true);

    // The dynamic files of deploy/traefik/dynamic, with the paths and addresses of this test.
    // (A deploy file that changed shape fails by name instead of testing something else.)
    let substitutions = [
        ("http://gatekeeper:5000", gk.url()),
        (
            "/etc/traefik/certs/client-ca.pem",
            certs.ca.display().to_string(),
        ),
        // The trusted service comes from Docker there, from the file provider here.
        ("@docker", "@file".to_string()),
    ];
    let mut used = [false; 3];
    for entry in std::fs::read_dir(deploy.join("traefik/dynamic")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (i, (from, to)) in substitutions.iter().enumerate() {
            used[i] |= text.contains(from);
            text = text.replace(from, to);
        }
        traefik.write_dynamic(&name, &text);
    }
    for (i, (from, _)) in substitutions.iter().enumerate() {
        assert!(
            used[i],
            "no file of deploy/traefik/dynamic contains {from:?}: update this test"
        );
    }
    let urls: BTreeMap<String, String> = [
        ("homeassistant", ha.origin()),
        ("immich", immich.origin()),
        ("nextcloud", nextcloud.origin()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let routers = compose_labels(&gk.url(), &urls);
    traefik.write_dynamic("compose-labels.yml", &routers.to_string());
    for router in [
        "ha@file",
        "immich@file",
        "immich-share@file",
        "nextcloud@file",
    ] {
        traefik.wait_router(router);
    }
    let port = traefik.entrypoint("websecure").port();
    let client_cert = Some((certs.client_cert.as_path(), certs.client_key.as_path()));

    // No certificate: the handshake fails, nothing is granted.
    let (status, error) = curl(NO_CERT, "ha.example.com", port, "/", None, &[]);
    assert_eq!(status, 0, "Home Assistant without a certificate: {error}");
    // A certificate the CA did not sign: refused too.
    let foreign = Some((certs.foreign_cert.as_path(), certs.foreign_key.as_path()));
    let (status, error) = curl(NO_CERT, "ha.example.com", port, "/", foreign, &[]);
    assert_eq!(
        status, 0,
        "Home Assistant with a foreign certificate: {error}"
    );

    // The phone with its certificate reaches Home Assistant; the mirrored copy grants it.
    let (status, error) = curl(PHONE, "ha.example.com", port, "/lovelace", client_cert, &[]);
    assert_eq!(status, 200, "Home Assistant with the certificate: {error}");
    traefik.wait_middleware_lists("gatekeeper-immich@file", &format!("{PHONE}/32"));
    traefik.wait_middleware_lists("gatekeeper-nextcloud@file", &format!("{PHONE}/32"));
    let (status, error) = curl(PHONE, "photos.example.com", port, "/", None, &[]);
    assert_eq!(status, 200, "Immich for the phone: {error}");
    let (status, error) = curl(PHONE, "cloud.example.com", port, "/", None, &[]);
    assert_eq!(status, 200, "Nextcloud for the phone: {error}");

    // A client with a certificate that claims another address: Traefik does not trust the
    // client's X-Forwarded-For (no forwardedHeaders.trustedIPs), so its real address is granted.
    let (status, error) = curl(
        SPOOFER,
        "ha.example.com",
        port,
        "/",
        client_cert,
        &["X-Forwarded-For: 127.0.0.99"],
    );
    assert_eq!(status, 200, "{error}");
    traefik.wait_middleware_lists("gatekeeper-immich@file", &format!("{SPOOFER}/32"));

    // The clients without a valid certificate were never granted.
    let granted = gk.granted();
    assert!(
        !granted.contains(&format!("{NO_CERT}/32")) && !granted.contains(&"127.0.0.99/32".into()),
        "{granted:?}"
    );
    let (status, _) = curl(NO_CERT, "photos.example.com", port, "/", None, &[]);
    assert_eq!(status, 403, "Immich for the client without a certificate");

    // The share router of compose.yaml with gatekeeper's forwardAuth: the link is answered 200
    // and the viewer's next request passes.
    let link = format!("/share/{}", key(1));
    let (status, error) = curl(VIEWER, "photos.example.com", port, &link, None, &[]);
    assert_eq!(status, 200, "the share link: {error}");
    let (status, error) = curl(VIEWER, "photos.example.com", port, "/photos/1", None, &[]);
    assert_eq!(status, 200, "the viewer's next request: {error}");
    let (status, _) = curl(VIEWER, "cloud.example.com", port, "/", None, &[]);
    assert_eq!(status, 403, "a share viewer does not reach Nextcloud");

    traefik.assert_no_problems();
    drop(traefik);
    drop(gk);
}

// ---------------------------------------------------------------------------------------------
// 6: the legacy drop-in
// ---------------------------------------------------------------------------------------------

/// The old deployment's dynamic configuration, for `ha.test` (mirrored to gatekeeper) and
/// `photos.test` (behind `dynamic-whitelist@file`), in the provider `provider` serves it from.
fn legacy_routers(gatekeeper: &str, ha: &str, app: &str) -> Value {
    json!({ "http": {
        "routers": {
            "ha": { "rule": "Host(`ha.test`)", "entryPoints": ["web"], "service": "ha-mirrored" },
            "photos": {
                "rule": format!("Host(`{PHOTOS}`)"), "entryPoints": ["web"],
                "middlewares": ["dynamic-whitelist@file"], "service": "app"
            }
        },
        "services": {
            "ha-mirrored": { "mirroring": {
                "service": "ha", "mirrorBody": false,
                "mirrors": [{ "name": "gatekeeper", "percent": 100 }]
            }},
            "ha": { "loadBalancer": { "servers": [{ "url": ha }] } },
            "gatekeeper": { "loadBalancer": { "servers": [{ "url": gatekeeper }] } },
            "app": { "loadBalancer": { "servers": [{ "url": app }] } }
        }
    }})
}

/// Legacy variables only, no policy file. The old app believed any private peer; here Traefik
/// and the clients share 127.0.0.0/8, so `GATEKEEPER_TRUSTED_PROXIES` narrows the trusted
/// proxies to Traefik (in a real install the clients' public addresses are not private).
fn legacy(single_file: bool) {
    let ha = StandIn::start(Mode::Answer, |_| common::upstream::Reply {
        status: 200,
        content_type: "text/plain",
        body: "home assistant\n".into(),
        location: None,
    });
    let app = StandIn::immich(&[], &[], Mode::Answer);
    let gk_dir = tempfile::tempdir().unwrap();
    let gk_path = gk_dir.path().to_path_buf();
    let gk = Gatekeeper::start_in(
        gk_dir,
        &[],
        &[
            ("GATEKEEPER_LISTEN", "127.0.0.1:0"),
            ("GATEKEEPER_ADMIN__LISTEN", "127.0.0.1:0"),
            ("GATEKEEPER_TRUSTED_PROXIES", "[127.0.0.1/32]"),
            ("MAX_IP_LEN", "5"),
            ("DEFAULT_SOURCE_RANGE", &format!("{WITNESS}/32")),
        ],
    );
    assert!(
        gk.daemon.log().contains("legacy mode"),
        "{}",
        gk.daemon.log()
    );
    let whitelist = gk_path.join("dynamic-whitelist.yml");
    wait_for("dynamic-whitelist.yml", SOON, || {
        read_lists(&whitelist).map(|_| ())
    });
    let routers = legacy_routers(&gk.url(), &ha.origin(), &app.origin());
    // Single file: exactly the legacy file, the routers from another provider (Docker labels
    // in the old deployment; an HTTP endpoint here). Directory: the routers beside it.
    let served = routers.to_string();
    let endpoint = StandIn::start(Mode::Answer, move |_| common::upstream::Reply {
        status: 200,
        content_type: "application/json",
        body: served.clone(),
        location: None,
    });
    let providers = if single_file {
        json!({
            "file": { "filename": whitelist, "watch": true },
            "http": { "endpoint": format!("{}/dynamic.json", endpoint.origin()), "pollInterval": "1s" }
        })
    } else {
        json!({ "file": { "directory": gk_path, "watch": true } })
    };
    let traefik = Traefik::new().start(web_with(providers));
    traefik.wait_source_range("dynamic-whitelist@file", "the witness only", |l| {
        l == [format!("{WITNESS}/32")]
    });
    if !single_file {
        std::fs::write(gk_path.join("routers.yml"), routers.to_string()).unwrap();
    }
    let provider = if single_file { "http" } else { "file" };
    traefik.wait_router(&format!("photos@{provider}"));
    traefik.wait_router(&format!("ha@{provider}"));
    let witness = Witness::start(&traefik, PHOTOS, WITNESS);

    assert_eq!(traefik.status("web", PHOTOS, "/", FRIEND), 403);
    // The friend uses the mirrored service; gatekeeper sees the copy and grants it.
    assert_eq!(traefik.status("web", "ha.test", "/", FRIEND), 200);
    traefik.wait_middleware_lists("dynamic-whitelist@file", &format!("{FRIEND}/32"));
    assert_eq!(traefik.status("web", PHOTOS, "/", FRIEND), 200);
    assert_eq!(traefik.status("web", PHOTOS, "/", STRANGER), 403);

    let seen = witness.finish();
    assert!(
        seen.iter().all(|s| *s == 200),
        "the always-allowed witness saw {seen:?}"
    );
    traefik.assert_no_problems();
}

#[test]
fn legacy_drop_in_single_file_mode() {
    legacy(true);
}

#[test]
fn legacy_drop_in_directory_mode() {
    legacy(false);
}

// ---------------------------------------------------------------------------------------------
// 7: two replicas on one Redis, Traefik on the KV provider
// ---------------------------------------------------------------------------------------------

#[test]
fn two_replicas_on_one_redis_a_grant_on_a_is_enforced_by_traefik() {
    let redis = redis_with_notifications();
    let app = StandIn::immich(&[], &[], Mode::Answer);
    let policy = format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\ntrusted_proxies: [127.0.0.1/32]\n\
         redis: {{ url: \"{url}\", key_prefix: gk-traefik }}\n\
         traefik: {{ redis: {{ url: \"{url}\" }} }}\n\
         services:\n  immich: {{ always_allow: [\"{WITNESS}/32\"] }}\n\
         sources:\n  ha: {{ kind: mirror, hosts: [ha.test], unlocks: [immich], max_ips: 10, idle_ttl: 1h }}\n",
        url = redis.url()
    );
    let a = Gatekeeper::start(&policy, &[]);
    let b = Gatekeeper::start(&policy, &[]);
    let traefik = Traefik::new();
    let providers = json!({
        "file": { "directory": traefik.dynamic(), "watch": true },
        "redis": { "endpoints": [format!("127.0.0.1:{}", redis.port())] }
    });
    let traefik = traefik.start(web_with(providers));
    traefik.wait_source_range("gatekeeper-immich@redis", "the witness only", |l| {
        l == [format!("{WITNESS}/32")]
    });
    let routers = json!({ "http": {
        "routers": { "immich": {
            "rule": format!("Host(`{PHOTOS}`)"), "entryPoints": ["web"],
            "middlewares": ["gatekeeper-immich@redis"], "service": "app"
        }},
        "services": { "app": { "loadBalancer": { "servers": [{ "url": app.origin() }] } } }
    }});
    traefik.write_dynamic("routers.yml", &routers.to_string());
    traefik.wait_router("immich@file");
    let witness = Witness::start(&traefik, PHOTOS, WITNESS);

    assert_eq!(traefik.status("web", PHOTOS, "/", FRIEND), 403);
    a.grant("ha", FRIEND);
    traefik.wait_middleware_lists("gatekeeper-immich@redis", &format!("{FRIEND}/32"));
    assert_eq!(traefik.status("web", PHOTOS, "/", FRIEND), 200);
    assert_eq!(allow_status(b.daemon.addr, "immich", FRIEND), 200);
    // Revoked on B: Traefik drops it.
    b.revoke(FRIEND);
    traefik.wait_middleware_lacks("gatekeeper-immich@redis", &format!("{FRIEND}/32"));
    assert_eq!(traefik.status("web", PHOTOS, "/", FRIEND), 403);

    let seen = witness.finish();
    assert!(seen.iter().all(|s| *s == 200), "witness saw {seen:?}");
    traefik.assert_no_problems();
}

// ---------------------------------------------------------------------------------------------
// 8: the names `check` and `labels` print work in Traefik
// ---------------------------------------------------------------------------------------------

/// The distinct `gatekeeper-immich@...` references in `text`.
fn references(text: &str) -> Vec<String> {
    let re = regex::Regex::new(r"gatekeeper-immich@[a-z]+").unwrap();
    let mut refs: Vec<String> = re.find_iter(text).map(|m| m.as_str().to_string()).collect();
    refs.sort();
    refs.dedup();
    refs
}

fn names_work(provider: Provider) {
    let app = StandIn::immich(&[], &[], Mode::Answer);
    let redis = (provider == Provider::Redis).then(redis_with_notifications);
    let traefik = Traefik::new();
    let gk = Gatekeeper::start(
        &policy(&provider.policy(&traefik, redis.as_ref()), &app.origin()),
        &[],
    );
    let check = run_ok(gk.dir.path(), &["check", "--config", "gatekeeper.yaml"]);
    let printed = labels(gk.dir.path(), &gk.url());
    let from_check = references(&check);
    let from_labels = references(&printed);
    assert_eq!(
        from_check.len(),
        1,
        "`check` should print one reference for immich:\n{check}"
    );
    assert_eq!(
        from_check, from_labels,
        "`check` and `labels` disagree:\n{check}\n{printed}"
    );
    let reference = &from_check[0];

    let providers = provider.traefik(&traefik, gk.daemon.addr, redis.as_ref());
    let traefik = traefik.start(web_with(providers));
    // Wait for the lists under the provider's own name (what gatekeeper serves), then use the
    // printed name.
    traefik.wait_source_range(
        &format!("gatekeeper-immich@{}", provider.suffix()),
        "loaded",
        |_| true,
    );
    let routers = json!({ "http": {
        "routers": { "immich": {
            "rule": format!("Host(`{PHOTOS}`)"), "entryPoints": ["web"],
            "middlewares": [reference], "service": "app"
        }},
        "services": { "app": { "loadBalancer": { "servers": [{ "url": app.origin() }] } } }
    }});
    traefik.write_dynamic("routers.yml", &routers.to_string());
    traefik.wait_router("immich@file");
    assert_eq!(
        traefik.status("web", PHOTOS, "/", WITNESS),
        200,
        "the router with {reference}"
    );
    assert_eq!(traefik.status("web", PHOTOS, "/", STRANGER), 403);
    traefik.assert_no_problems();
}

#[test]
fn names_printed_for_a_file_only_policy_work_in_traefik() {
    names_work(Provider::File);
}

#[test]
fn names_printed_for_an_http_only_policy_work_in_traefik() {
    names_work(Provider::Http);
}

#[test]
fn names_printed_for_a_redis_kv_policy_work_in_traefik() {
    names_work(Provider::Redis);
}
