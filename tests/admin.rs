//! The admin listener and the operator CLI against the real binary over real sockets: the API is
//! closed without the token and off without one configured; grants and revocations (through the
//! API and through `gatekeeper grant` / `revoke`) reach the Traefik file when made (not at a
//! periodic flush) and `list` shows them; `health` gives the exit status a container HEALTHCHECK needs; the metrics,
//! parsed, move with grants, expiries and share checks.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::Value;

const TOKEN: &str = "7f3c1d0e9b8a-admin-token";
/// Three services, a mirror source unlocking all of them, a mirror source whose entries idle out
/// after a second, and a share source whose upstream (`@DEAD@`) has nothing listening.
const POLICY: &str = r#"always_allow: [198.51.100.0/24]
services: { immich: {}, nextcloud: {}, jellyfin: { always_allow: [192.0.2.7/32] } }
sources:
  ha: { kind: mirror, hosts: [ha.example.com], unlocks: "*", max_ips: 10, idle_ttl: 1h }
  brief: { kind: mirror, hosts: [brief.example.com], unlocks: [jellyfin], max_ips: 5, idle_ttl: 1s }
  links:
    kind: share
    upstream: http://127.0.0.1:@DEAD@
    path: '^/s/[A-Za-z0-9]{15}$'
    unlocks: [nextcloud]
    max_ips: 20
    idle_ttl: 1h
    timeout: 1s
"#;

fn setup() -> Setup {
    Setup::new(&POLICY.replace("@DEAD@", &free_port().to_string()))
}

/// A running daemon with its admin address.
struct Running {
    daemon: Daemon,
    admin: SocketAddr,
}

/// Start the daemon of `setup` with `env`; its admin address is read from its log.
fn start(setup: &Setup, env: &[(&str, &str)]) -> Running {
    let daemon = Daemon::start(setup.dir.path(), &["--config", "gatekeeper.yaml"], env);
    let admin = daemon.admin_addr();
    Running { daemon, admin }
}

fn start_with_token(setup: &Setup) -> Running {
    start(setup, &[("GATEKEEPER_ADMIN__TOKEN", TOKEN)])
}

// ---------------------------------------------------------------------------------------------
// HTTP with bodies
// ---------------------------------------------------------------------------------------------

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An API request with the right token.
fn api(admin: SocketAddr, method: &str, target: &str, body: &str) -> Reply {
    http(
        admin,
        method,
        target,
        &[("Authorization", &bearer(TOKEN))],
        body,
    )
}

/// The entries `GET /api/v1/entries` lists, as (source, network).
fn api_entries(admin: SocketAddr) -> Vec<(String, String)> {
    let r = api(admin, "GET", "/api/v1/entries", "");
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["entries"]
        .as_array()
        .expect("entries list")
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().to_string(),
                e["network"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn has(lists: &Lists, service: &str, network: &str) -> bool {
    lists
        .get(&format!("gatekeeper-{service}"))
        .is_some_and(|l| l.iter().any(|n| n == network))
}

/// Wait for the Traefik file to satisfy `check` after a change made through the API. A change is
/// written when it is made; the only other writes are the periodic flushes, 30 s apart, later than
/// [`SOON`] gives up: a change left to the flush fails here. No bound on the machine's speed.
fn written_after_change(setup: &Setup, what: &str, check: impl Fn(&Lists) -> bool) {
    setup.wait_lists(what, SOON, check);
}

fn parse_time(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("`{s}` is not RFC 3339: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The CLI
// ---------------------------------------------------------------------------------------------

/// `gatekeeper ARGS --config gatekeeper.yaml` in the test's directory, reaching the daemon at
/// `admin` (its policy says port 0, so the address comes from the environment, as figment
/// layers it), with `token` as `GATEKEEPER_ADMIN__TOKEN`.
fn cli(
    setup: &Setup,
    admin: SocketAddr,
    token: Option<&str>,
    args: &[&str],
) -> (ExitStatus, String, String) {
    let listen = admin.to_string();
    let mut env = vec![("GATEKEEPER_ADMIN__LISTEN", listen.as_str())];
    if let Some(t) = token {
        env.push(("GATEKEEPER_ADMIN__TOKEN", t));
    }
    let mut all = args.to_vec();
    all.extend(["--config", "gatekeeper.yaml"]);
    run(setup.dir.path(), &all, &env)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn api_is_off_and_says_so_without_a_configured_token() {
    let setup = setup();
    let r = start(&setup, &[]);
    assert!(
        r.daemon.log().contains("admin API is off"),
        "{}",
        r.daemon.log()
    );
    for (method, target, body) in [
        ("GET", "/api/v1/entries", ""),
        (
            "POST",
            "/api/v1/entries",
            r#"{"source":"ha","address":"203.0.113.5"}"#,
        ),
        ("DELETE", "/api/v1/entries/203.0.113.5", ""),
    ] {
        // A token changes nothing: there is none to match, so the API is never open.
        for headers in [vec![], vec![("Authorization", "Bearer anything")]] {
            let reply = http(r.admin, method, target, &headers, body);
            assert_eq!(reply.status, 403, "{method} {target}: {reply:?}");
            assert_eq!(
                reply.error(),
                "the admin API is off: set admin.token_file or GATEKEEPER_ADMIN__TOKEN"
            );
        }
    }
    // Nothing was granted; health, metrics and the page still answer.
    assert!(
        setup
            .lists()
            .values()
            .all(|l| !l.contains(&"203.0.113.5/32".to_string()))
    );
    let health = http(r.admin, "GET", "/healthz", &[], "");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert_eq!(http(r.admin, "GET", "/metrics", &[], "").status, 200);
    assert_eq!(http(r.admin, "GET", "/", &[], "").status, 200);
}

#[test]
fn api_without_or_with_a_wrong_token_is_401() {
    let setup = setup();
    std::fs::write(setup.dir.path().join("admin-token"), format!("{TOKEN}\n")).unwrap();
    // The daemon reads the token from admin.token_file.
    let r = start(&setup, &[("GATEKEEPER_ADMIN__TOKEN_FILE", "admin-token")]);
    let same_length_wrong: String = TOKEN.chars().rev().collect();
    let grant = r#"{"source":"ha","address":"203.0.113.5"}"#;
    let wrong = [
        None,
        Some("Bearer".to_string()),
        Some(bearer("wrong")),
        Some(bearer(&same_length_wrong)),
        Some(bearer(&format!("{TOKEN}x"))),
        Some(format!("Basic {TOKEN}")),
    ];
    for auth in &wrong {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        for (method, target, body) in [
            ("GET", "/api/v1/entries", ""),
            ("POST", "/api/v1/entries", grant),
            ("DELETE", "/api/v1/entries/203.0.113.5", ""),
        ] {
            let reply = http(r.admin, method, target, &headers, body);
            assert_eq!(
                reply.status, 401,
                "{method} {target} with {auth:?}: {reply:?}"
            );
            assert_eq!(
                reply.header("www-authenticate"),
                Some("Bearer"),
                "{reply:?}"
            );
            assert!(!reply.body.contains(TOKEN), "{reply:?}");
        }
    }
    // The refused grant granted nothing.
    assert!(api_entries(r.admin).is_empty());
    // The scheme is case-insensitive, as RFC 9110 says.
    let ok = http(
        r.admin,
        "GET",
        "/api/v1/entries",
        &[("Authorization", &format!("bearer {TOKEN}"))],
        "",
    );
    assert_eq!((ok.status, ok.body.as_str()), (200, r#"{"entries":[]}"#));
}

#[test]
fn api_grant_and_revoke_reach_the_traefik_file_when_made() {
    let setup = setup();
    let r = start_with_token(&setup);
    setup.wait_lists("the first Traefik file", SOON, |l| l.len() == 3);

    // Grant through a source that unlocks every service, with a TTL.
    let reply = api(
        r.admin,
        "POST",
        "/api/v1/entries",
        r#"{"source":"ha","address":"203.0.113.5","ttl":"1h"}"#,
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    let entry = reply.json();
    assert_eq!(entry["source"], "ha");
    assert_eq!(entry["network"], "203.0.113.5/32");
    assert_eq!(entry["identity"], Value::Null);
    assert_eq!(entry["hits"], 1);
    let first = parse_time(entry["first_seen"].as_str().unwrap());
    let expires = parse_time(entry["expires"].as_str().expect("a ttl means an expiry"));
    let ttl = expires.duration_since(first).unwrap();
    assert!(
        ttl <= Duration::from_secs(3600) && ttl >= Duration::from_secs(3598),
        "expires {ttl:?} after first seen"
    );
    // Acknowledged means on disk: the state file holds it as the 201 arrives.
    assert!(
        state_networks(&setup.state)
            .unwrap()
            .contains("203.0.113.5/32"),
        "{:?}",
        setup.state_entries()
    );
    written_after_change(&setup, "the granted address on every service", |l| {
        ["immich", "nextcloud", "jellyfin"]
            .iter()
            .all(|s| has(l, s, "203.0.113.5/32"))
    });

    // A bare IPv6 address is granted its /64; this source unlocks nextcloud only.
    let reply = api(
        r.admin,
        "POST",
        "/api/v1/entries",
        r#"{"source":"links","address":"2001:db8:1:2::99"}"#,
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.json()["network"], "2001:db8:1:2::/64");
    assert!(reply.json()["expires"].is_string(), "{reply:?}");
    let lists = setup.wait_lists("the /64 on nextcloud", SOON, |l| {
        has(l, "nextcloud", "2001:db8:1:2::/64")
    });
    assert!(!has(&lists, "immich", "2001:db8:1:2::/64"), "{lists:?}");
    assert_eq!(
        api_entries(r.admin),
        vec![
            ("ha".to_string(), "203.0.113.5/32".to_string()),
            ("links".to_string(), "2001:db8:1:2::/64".to_string()),
        ]
    );

    // Bad grants are refused with the bad value named, and grant nothing.
    for (body, needle) in [
        (
            r#"{"source":"ha","address":"203.0.113.300"}"#,
            "`203.0.113.300`",
        ),
        (r#"{"source":"nosuch","address":"203.0.113.6"}"#, "`nosuch`"),
        (
            r#"{"source":"ha","address":"198.51.100.9"}"#,
            "198.51.100.0/24",
        ),
        (r#"{"source":"ha","address":"127.0.0.1"}"#, "trusted proxy"),
        (r#"{"source":"ha","address":"203.0.0.0/8"}"#, "too wide"),
        (
            r#"{"source":"ha","address":"203.0.113.6","ttl":"forever"}"#,
            "`forever`",
        ),
        (r#"{"source":"ha","adress":"203.0.113.6"}"#, "adress"),
        ("not json", "bad request body"),
    ] {
        let reply = api(r.admin, "POST", "/api/v1/entries", body);
        assert_eq!(reply.status, 400, "{body}: {reply:?}");
        assert!(reply.error().contains(needle), "{body}: {}", reply.error());
    }
    assert_eq!(api_entries(r.admin).len(), 2);

    // Revoke the /64 by its URL-encoded network; a second time finds nothing.
    let reply = api(r.admin, "DELETE", "/api/v1/entries/2001:db8:1:2::%2F64", "");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.json(),
        serde_json::json!({"removed": [{"source": "links", "network": "2001:db8:1:2::/64", "identity": null}]})
    );
    written_after_change(&setup, "the /64 gone from nextcloud", |l| {
        !has(l, "nextcloud", "2001:db8:1:2::/64")
    });
    let again = api(r.admin, "DELETE", "/api/v1/entries/2001:db8:1:2::%2F64", "");
    assert_eq!(again.status, 404, "{again:?}");
    assert!(again.error().contains("2001:db8:1:2::/64"), "{again:?}");

    // `?source=` narrows: the IPv4 entry is not one of `links`, then it is revoked from `ha`
    // by its CIDR written out.
    let narrow = api(
        r.admin,
        "DELETE",
        "/api/v1/entries/203.0.113.5?source=links",
        "",
    );
    assert_eq!(narrow.status, 404, "{narrow:?}");
    let unknown = api(
        r.admin,
        "DELETE",
        "/api/v1/entries/203.0.113.5?source=nosuch",
        "",
    );
    assert_eq!(unknown.status, 400, "{unknown:?}");
    assert!(unknown.error().contains("`nosuch`"), "{unknown:?}");
    let reply = api(
        r.admin,
        "DELETE",
        "/api/v1/entries/203.0.113.5/32?source=ha",
        "",
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["removed"][0]["network"], "203.0.113.5/32");
    written_after_change(&setup, "203.0.113.5 gone from every service", |l| {
        l.values()
            .all(|list| !list.contains(&"203.0.113.5/32".to_string()))
    });
    assert!(api_entries(r.admin).is_empty());
    // Always-allowed ranges were never touched.
    assert!(has(&setup.lists(), "jellyfin", "192.0.2.7/32"));
}

#[test]
fn cli_grant_revoke_and_list_go_through_the_api() {
    let setup = setup();
    let r = start_with_token(&setup);
    setup.wait_lists("the first Traefik file", SOON, |l| l.len() == 3);

    let (status, stdout, stderr) = cli(
        &setup,
        r.admin,
        Some(TOKEN),
        &["grant", "203.0.113.20", "--source", "ha", "--ttl", "2h"],
    );
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.starts_with("granted 203.0.113.20/32 through ha, until "),
        "{stdout}"
    );
    written_after_change(&setup, "the CLI grant on every service", |l| {
        ["immich", "nextcloud", "jellyfin"]
            .iter()
            .all(|s| has(l, s, "203.0.113.20/32"))
    });
    let (status, stdout, stderr) = cli(
        &setup,
        r.admin,
        Some(TOKEN),
        &["grant", "2001:db8:7::1", "--source", "links"],
    );
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.starts_with("granted 2001:db8:7::/64 through links"),
        "{stdout}"
    );

    // `list`: an aligned table with a header, one row per entry.
    let (status, stdout, stderr) = cli(&setup, r.admin, Some(TOKEN), &["list"]);
    assert!(status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["SOURCE", "NETWORK", "IDENTITY", "LAST", "SEEN", "EXPIRES"],
        "{stdout}"
    );
    let network_column = lines[0].find("NETWORK").unwrap();
    for (line, source, network) in [
        (lines[1], "ha", "203.0.113.20/32"),
        (lines[2], "links", "2001:db8:7::/64"),
    ] {
        assert!(line.starts_with(source), "{stdout}");
        assert_eq!(
            line.find(network),
            Some(network_column),
            "not aligned:\n{stdout}"
        );
        assert!(line.contains(" ago "), "{stdout}");
        // idle_ttl (1h) comes before the 2h ttl.
        assert!(
            line.contains(" in 59m ") || line.ends_with(" in 1h"),
            "{stdout}"
        );
    }
    // `list --json`: the API's JSON.
    let (status, stdout, stderr) = cli(&setup, r.admin, Some(TOKEN), &["list", "--json"]);
    assert!(status.success(), "{stderr}");
    let json: Value = serde_json::from_str(&stdout).expect("list --json prints JSON");
    let entries = json["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{stdout}");
    assert_eq!(entries[0]["network"], "203.0.113.20/32");
    assert!(entries[0]["expires"].is_string(), "{stdout}");

    // Revoke: gone from the file and from `list`.
    let (status, stdout, stderr) = cli(&setup, r.admin, Some(TOKEN), &["revoke", "203.0.113.20"]);
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout, "revoked 203.0.113.20/32 from ha\n");
    written_after_change(&setup, "the CLI revoke in the file", |l| {
        l.values()
            .all(|list| !list.contains(&"203.0.113.20/32".to_string()))
    });
    let (status, stdout, stderr) = cli(
        &setup,
        r.admin,
        Some(TOKEN),
        &["revoke", "2001:db8:7::/64", "--source", "links"],
    );
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout, "revoked 2001:db8:7::/64 from links\n");
    let (_, stdout, _) = cli(&setup, r.admin, Some(TOKEN), &["list"]);
    assert_eq!(stdout, "no entries\n");

    // Failures are one plain line and exit 1.
    for (token, args, message) in [
        (
            Some(TOKEN),
            &["revoke", "203.0.113.20"][..],
            "error: 203.0.113.20/32 is not an entry of any source\n",
        ),
        (
            Some(TOKEN),
            &["grant", "203.0.113.21", "--source", "nosuch"][..],
            "error: no source `nosuch` in the policy (sources: brief, ha, links)\n",
        ),
        (
            None,
            &["list"][..],
            &format!(
                "error: gatekeeper at {} needs the admin token: set admin.token_file or \
                 GATEKEEPER_ADMIN__TOKEN for this command as for the daemon\n",
                r.admin
            ),
        ),
        (
            Some("not-the-token"),
            &["list"][..],
            &format!(
                "error: gatekeeper at {} refused the admin token: admin.token_file or \
                 GATEKEEPER_ADMIN__TOKEN differ from the daemon's\n",
                r.admin
            ),
        ),
    ] {
        let (status, stdout, stderr) = cli(&setup, r.admin, token, args);
        assert_eq!(status.code(), Some(1), "{args:?}: {stdout}{stderr}");
        assert_eq!(stderr, message, "{args:?}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
    }
}

#[test]
fn health_exit_status_follows_the_daemon() {
    let setup = setup();
    let r = start(&setup, &[]);
    setup.wait_lists("the first Traefik file", SOON, |l| l.len() == 3);

    // Healthy, and no token needed.
    let (status, stdout, stderr) = cli(&setup, r.admin, None, &["health"]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "ok\n");
    // An unspecified listen address (the container default) is reached on loopback.
    let any = SocketAddr::from(([0, 0, 0, 0], r.admin.port()));
    let (status, _, stderr) = cli(&setup, any, None, &["health"]);
    assert_eq!(status.code(), Some(0), "{stderr}");

    // Outputs failing: the Traefik file's path became a directory, so no write can land.
    std::fs::remove_file(&setup.traefik).unwrap();
    std::fs::create_dir(&setup.traefik).unwrap();
    assert_eq!(mirror(r.daemon.addr, "ha.example.com", "203.0.113.30"), 200);
    let stderr = wait_for("health to fail", SOON, || {
        let (status, _, stderr) = cli(&setup, r.admin, None, &["health"]);
        if status.code() == Some(1) {
            Ok(stderr)
        } else {
            Err(format!("{status}: {stderr}"))
        }
    });
    assert!(
        stderr.starts_with("error: unhealthy: outputs failing: ") && stderr.ends_with('\n'),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let health = http(r.admin, "GET", "/healthz", &[], "");
    assert_eq!(health.status, 503, "{health:?}");

    // Nothing listening: a plain message naming the address and the key, exit 1.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (status, stdout, stderr) = cli(&setup, dead, None, &["health"]);
    assert_eq!(status.code(), Some(1));
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(
        stderr,
        format!("error: gatekeeper is not running at {dead} (admin.listen)\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// A sample's identity: metric name and its labels.
type Key = (String, BTreeMap<String, String>);

/// Parse the Prometheus text format: every sample line into (name, labels) → value, checking
/// that each belongs to a family declared with `# TYPE` and appears once.
fn parse_metrics(text: &str) -> BTreeMap<Key, f64> {
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("no }}: {line}"));
                (name.to_string(), parse_labels(body, line))
            }
        };
        assert!(types.contains_key(&name), "{name} has no # TYPE line");
        assert!(
            samples.insert((name, labels), value).is_none(),
            "duplicate sample: {line}"
        );
    }
    samples
}

/// `a="x",b="y\"z"` → {a: x, b: y"z}.
fn parse_labels(body: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    while chars.peek().is_some() {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label value not quoted: {line}");
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape: {line}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value: {line}"),
            }
        }
        labels.insert(name, value);
        match chars.next() {
            Some(',') | None => {}
            Some(c) => panic!("unexpected {c:?} after a label: {line}"),
        }
    }
    labels
}

struct Scrape(BTreeMap<Key, f64>);

impl Scrape {
    fn take(admin: SocketAddr) -> Scrape {
        let r = http(admin, "GET", "/metrics", &[], "");
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{r:?}"
        );
        Scrape(parse_metrics(&r.body))
    }

    /// The sample's value; 0 when absent (a counter that never moved is not shown).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.0
            .get(&(name.to_string(), labels))
            .copied()
            .unwrap_or(0.0)
    }
}

/// A forward-auth share check of `uri` for client `client`.
fn share_check(proxy: SocketAddr, source: &str, client: &str, uri: &str) -> u16 {
    let req = format!(
        "GET /share/{source} HTTP/1.1\r\nHost: gatekeeper\r\nX-Forwarded-For: {client}\r\n\
         X-Forwarded-Uri: {uri}\r\nConnection: close\r\n\r\n"
    );
    send_raw(proxy, req.into_bytes()).unwrap().status
}

#[test]
fn metrics_move_with_grants_expiries_and_checks() {
    let setup = setup();
    let r = start(&setup, &[]);
    setup.wait_lists("the first Traefik file", SOON, |l| l.len() == 3);
    let before = Scrape::take(r.admin);
    // Gauges from the policy alone: every source at 0; always_allow on every list.
    for source in ["ha", "brief", "links"] {
        assert_eq!(before.get("gatekeeper_entries", &[("source", source)]), 0.0);
        assert!(
            before.0.contains_key(&(
                "gatekeeper_entries".to_string(),
                [("source".to_string(), source.to_string())].into()
            )),
            "no gatekeeper_entries for {source}"
        );
    }
    for (service, n) in [("immich", 1.0), ("nextcloud", 1.0), ("jellyfin", 2.0)] {
        assert_eq!(
            before.get("gatekeeper_allowed_networks", &[("service", service)]),
            n
        );
    }

    // A mirrored grant.
    assert_eq!(mirror(r.daemon.addr, "ha.example.com", "203.0.113.5"), 200);
    assert_eq!(mirror(r.daemon.addr, "ha.example.com", "203.0.113.5"), 200);
    let after = Scrape::take(r.admin);
    let moved =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    assert_eq!(moved("gatekeeper_grants_total", &[("source", "ha")]), 1.0);
    assert_eq!(
        moved(
            "gatekeeper_requests_total",
            &[("endpoint", "mirror"), ("status", "200")]
        ),
        2.0
    );
    assert_eq!(after.get("gatekeeper_entries", &[("source", "ha")]), 1.0);
    for (service, n) in [("immich", 2.0), ("nextcloud", 2.0), ("jellyfin", 3.0)] {
        assert_eq!(
            after.get("gatekeeper_allowed_networks", &[("service", service)]),
            n
        );
    }
    // The write it caused is counted (the flusher runs right after the grant).
    let writes = wait_for("a counted traefik write", SOON, || {
        let s = Scrape::take(r.admin);
        let n = s.get(
            "gatekeeper_output_writes_total",
            &[("output", "traefik"), ("result", "ok")],
        );
        if n > before.get(
            "gatekeeper_output_writes_total",
            &[("output", "traefik"), ("result", "ok")],
        ) {
            Ok(s)
        } else {
            Err(format!("{n}"))
        }
    });
    assert!(
        writes.get(
            "gatekeeper_output_writes_total",
            &[("output", "state"), ("result", "ok")]
        ) >= 1.0
    );

    // Share checks: a URI that is not a link is refused before anything is sent; a link goes to
    // an upstream that is not there and fails closed.
    let before = Scrape::take(r.admin);
    assert_eq!(
        share_check(r.daemon.addr, "links", "203.0.113.40", "/not/a/link"),
        403
    );
    assert_eq!(
        share_check(r.daemon.addr, "links", "203.0.113.40", "/s/abcdefghijklmno"),
        503
    );
    assert_eq!(
        share_check(r.daemon.addr, "links", "203.0.113.41", "/s/abcdefghijklmno"),
        503
    );
    let after = Scrape::take(r.admin);
    let moved =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    assert_eq!(
        moved(
            "gatekeeper_share_checks_total",
            &[("source", "links"), ("outcome", "refused")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "gatekeeper_share_checks_total",
            &[("source", "links"), ("outcome", "unreachable")]
        ),
        2.0
    );
    assert_eq!(
        moved(
            "gatekeeper_requests_total",
            &[("endpoint", "share"), ("status", "403")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "gatekeeper_requests_total",
            &[("endpoint", "share"), ("status", "503")]
        ),
        2.0
    );
    assert_eq!(after.get("gatekeeper_entries", &[("source", "links")]), 0.0);

    // An entry of `brief` (idle_ttl: 1s) expires on its own and is counted once.
    assert_eq!(
        mirror(r.daemon.addr, "brief.example.com", "203.0.113.50"),
        200
    );
    let granted = Scrape::take(r.admin);
    assert_eq!(
        granted.get("gatekeeper_grants_total", &[("source", "brief")]),
        1.0
    );
    assert_eq!(
        granted.get("gatekeeper_entries", &[("source", "brief")]),
        1.0
    );
    assert_eq!(
        granted.get("gatekeeper_allowed_networks", &[("service", "jellyfin")]),
        4.0
    );
    let expired = wait_for("the brief entry to expire", SOON, || {
        let s = Scrape::take(r.admin);
        let n = s.get(
            "gatekeeper_removals_total",
            &[("source", "brief"), ("reason", "expired")],
        );
        if n >= 1.0 {
            Ok(s)
        } else {
            Err(format!("expired = {n}"))
        }
    });
    assert_eq!(
        expired.get(
            "gatekeeper_removals_total",
            &[("source", "brief"), ("reason", "expired")]
        ),
        1.0
    );
    assert_eq!(
        expired.get("gatekeeper_entries", &[("source", "brief")]),
        0.0
    );
    assert_eq!(
        expired.get("gatekeeper_allowed_networks", &[("service", "jellyfin")]),
        3.0
    );
    // The long-lived entry did not go with it.
    assert_eq!(expired.get("gatekeeper_entries", &[("source", "ha")]), 1.0);
    assert_eq!(
        expired.get(
            "gatekeeper_removals_total",
            &[("source", "ha"), ("reason", "expired")]
        ),
        0.0
    );
}

#[test]
fn metrics_parser_reads_labels_and_escapes() {
    let text =
        "# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"u\\\\o\\nte\"} 3\n# TYPE y gauge\ny 2\n";
    let m = parse_metrics(text);
    let labels: BTreeMap<String, String> = [
        ("a".to_string(), "1".to_string()),
        ("b".to_string(), "q\"u\\o\nte".to_string()),
    ]
    .into();
    assert_eq!(m[&("x_total".to_string(), labels)], 3.0);
    assert_eq!(m[&("y".to_string(), BTreeMap::new())], 2.0);
}

#[test]
fn an_api_grant_is_not_acknowledged_until_it_is_on_disk() {
    let setup = setup();
    let r = start_with_token(&setup);
    wait_for("the first state file", SOON, || read_state(&setup.state));
    // Every write of the state file fails from now on: a directory takes its place.
    std::fs::remove_file(&setup.state).unwrap();
    std::fs::create_dir(&setup.state).unwrap();
    // The answer comes (after the daemon's own wait for the disk) rather than never: PATIENCE
    // only catches a hang.
    let reply = http_within(
        r.admin,
        "POST",
        "/api/v1/entries",
        &[("Authorization", &bearer(TOKEN))],
        r#"{"source":"ha","address":"203.0.113.60"}"#,
        PATIENCE,
    );
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.error().contains("not on disk"), "{reply:?}");
    // No internal detail (paths, OS errors) in the answer.
    assert!(!reply.body.contains("state.json"), "{reply:?}");
    let health = http(r.admin, "GET", "/healthz", &[], "");
    assert_eq!(health.status, 503, "{health:?}");
}
