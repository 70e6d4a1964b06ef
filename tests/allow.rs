//! Forward-auth decisions and the Traefik HTTP provider end to end: `/allow/{service}` answers
//! from memory (a grant or an expiry counts at once, whatever the file), `always_allow` ranges
//! pass, untrusted peers are refused whatever their forwarding header says, and
//! `/traefik/dynamic.json` is exactly the Traefik file.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::upstream::{Request, allow_status, yaml_to_json};
use common::*;
use serde_json::Value;

/// Global and per-service `always_allow`; `ha` unlocks immich and nextcloud, `short` (1 s idle
/// TTL) unlocks jellyfin. Loopback (the tests) and 10.0.0.0/8 (a second proxy hop in
/// X-Forwarded-For) are trusted.
const DECISIONS: &str = "\
trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]
always_allow: [198.51.100.0/24]
services:
  immich: {}
  nextcloud: { always_allow: [192.0.2.0/28] }
  jellyfin: {}
sources:
  ha: { kind: mirror, hosts: [ha.example.com], unlocks: [immich, nextcloud], max_ips: 10, idle_ttl: 1h }
  short: { kind: mirror, hosts: [short.example.com], unlocks: [jellyfin], max_ips: 10, idle_ttl: 1s }
";

/// A temp dir whose policy is `text` as is (its own `traefik:` mapping).
fn setup_exact(text: &str) -> Setup {
    let setup = Setup::new("");
    std::fs::write(&setup.policy, text).expect("write policy");
    setup
}

fn allow(addr: SocketAddr, service: &str, client: &str) -> u16 {
    allow_status(addr, service, client)
}

#[test]
fn allow_decision_table() {
    let setup = Setup::new(DECISIONS);
    let daemon = setup.start();
    let addr = daemon.addr;
    // Granted by a mirrored request; asked right after, with no wait for any file.
    assert_eq!(mirror(addr, "ha.example.com", "203.0.113.5"), 200);
    assert_eq!(mirror(addr, "ha.example.com", "2001:db8:5::1"), 200);

    let cases: &[(&str, &str, [u16; 3])] = &[
        // (why, X-Forwarded-For, [immich, nextcloud, jellyfin])
        ("granted for ha's services", "203.0.113.5", [200, 200, 403]),
        (
            "granted, IPv4-mapped IPv6",
            "::ffff:203.0.113.5",
            [200, 200, 403],
        ),
        (
            "granted /64, another address",
            "2001:db8:5::abcd",
            [200, 200, 403],
        ),
        ("another /64", "2001:db8:6::1", [403, 403, 403]),
        ("never granted", "203.0.113.6", [403, 403, 403]),
        ("global always_allow", "198.51.100.77", [200, 200, 200]),
        ("nextcloud's own always_allow", "192.0.2.3", [403, 200, 403]),
        (
            "just outside nextcloud's range",
            "192.0.2.16",
            [403, 403, 403],
        ),
        (
            "an allowed address spoofed on the left",
            "198.51.100.77, 203.0.113.6",
            [403, 403, 403],
        ),
        (
            "the client behind a trusted hop",
            "203.0.113.5, 10.0.0.2",
            [200, 200, 403],
        ),
        ("garbage", "not-an-ip", [403, 403, 403]),
    ];
    let mut wrong = Vec::new();
    for (why, xff, want) in cases {
        let got = ["immich", "nextcloud", "jellyfin"].map(|s| allow(addr, s, xff));
        if got != *want {
            wrong.push(format!("{why} ({xff}): got {got:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // The proxy itself (no X-Forwarded-For) is judged by the lists alone: never granted.
    let a = Request::new("GET", "/allow/immich").send(addr);
    assert_eq!(a.status, 403, "{a:?}");
    // Any method: nginx's auth_request keeps the client's.
    for method in ["HEAD", "POST", "PUT"] {
        let a = Request::new(method, "/allow/immich")
            .header("X-Forwarded-For", "203.0.113.5")
            .header("Content-Length", "0")
            .send(addr);
        assert_eq!(a.status, 200, "{method}: {a:?}");
    }
}

#[test]
fn unknown_service_is_404_naming_it() {
    let setup = Setup::new(DECISIONS);
    let daemon = setup.start();
    for service in ["photos", "gatekeeper-immich"] {
        let a = Request::new("GET", &format!("/allow/{service}"))
            .header("X-Forwarded-For", "198.51.100.77")
            .send(daemon.addr);
        assert_eq!(a.status, 404, "{service}: {a:?}");
        assert!(
            a.body.contains(&format!("`{service}`")),
            "{service}: {}",
            a.body
        );
    }
}

#[test]
fn decision_follows_a_grant_at_once_and_its_expiry_without_any_file() {
    // The Traefik file's directory is a regular file: the file can never be written, so every
    // decision below comes from memory.
    let setup = Setup::new(DECISIONS);
    let text = std::fs::read_to_string(&setup.policy).unwrap();
    std::fs::write(
        &setup.policy,
        text.replace("./traefik/gatekeeper.yml", "./blocked/gatekeeper.yml"),
    )
    .unwrap();
    std::fs::write(setup.dir.path().join("blocked"), "not a directory").unwrap();
    let daemon = setup.start();
    let addr = daemon.addr;

    assert_eq!(allow(addr, "jellyfin", "203.0.113.7"), 403);
    let granted = Instant::now();
    assert_eq!(mirror(addr, "short.example.com", "203.0.113.7"), 200);
    assert_eq!(allow(addr, "jellyfin", "203.0.113.7"), 200, "at once");
    assert_eq!(allow(addr, "immich", "203.0.113.7"), 403);

    // It expires by itself (SOON, the harness's liveness deadline, only catches an entry that
    // does not), and not before its idle_ttl: a lower bound, which a slow machine cannot break.
    wait_for("the 1 s grant to expire", SOON, || {
        match allow(addr, "jellyfin", "203.0.113.7") {
            403 => Ok(()),
            other => Err(format!("still {other}")),
        }
    });
    let lived = granted.elapsed();
    assert!(
        lived >= Duration::from_millis(950),
        "expired after {lived:?}, idle_ttl is 1s"
    );
    assert!(
        !setup.dir.path().join("blocked/gatekeeper.yml").exists(),
        "no file was involved"
    );
    daemon.wait_log("cannot write outputs");
}

#[test]
fn untrusted_peer_gets_403_even_for_an_allowed_client() {
    // Only a proxy that is not the test's loopback address is trusted.
    let setup = Setup::new(&DECISIONS.replace(
        "trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]",
        "trusted_proxies: [10.99.0.0/16]",
    ));
    // A grant restored from the state file, so the client is on the list without any request.
    std::fs::create_dir_all(setup.state.parent().unwrap()).unwrap();
    let now = now_millis();
    std::fs::write(
        &setup.state,
        format!(
            r#"{{"format":1,"entries":[{{"source":"ha","network":"203.0.113.9/32","first_seen":{now},"last_seen":{now},"hits":1}}]}}"#
        ),
    )
    .unwrap();
    let daemon = setup.start();
    setup.wait_lists("the restored grant in the Traefik file", SOON, |l| {
        l["gatekeeper-immich"].contains(&"203.0.113.9/32".to_string())
    });

    for (why, xff) in [
        ("granted client", Some("203.0.113.9")),
        ("global always_allow", Some("198.51.100.77")),
        ("nextcloud's always_allow", Some("192.0.2.3")),
        ("no X-Forwarded-For", None),
    ] {
        for service in ["immich", "nextcloud"] {
            let mut r = Request::new("GET", &format!("/allow/{service}"));
            if let Some(xff) = xff {
                r = r.header("X-Forwarded-For", xff);
            }
            let a = r.send(daemon.addr);
            assert_eq!(a.status, 403, "{why} on {service}: {a:?}");
        }
    }
    let a = Request::new("GET", "/traefik/dynamic.json").send(daemon.addr);
    assert_eq!(a.status, 403, "{a:?}");
    assert!(
        !a.body.contains("203.0.113.9"),
        "the list leaked: {}",
        a.body
    );
}

/// Policies for the HTTP provider: a service with nobody allowed, one with its own range, an
/// `ipStrategy`, and both Traefik versions.
fn provider_policy(version: u8) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
state_file: ./data/state.json
traefik:
  file: ./traefik/gatekeeper.yml
  version: {version}
  ip_strategy: {{ depth: 1, excluded_ips: [10.0.0.0/8] }}
services:
  immich: {{}}
  nextcloud: {{ always_allow: [192.0.2.0/28] }}
  jellyfin: {{}}
sources:
  ha: {{ kind: mirror, hosts: [ha.example.com], unlocks: [immich, nextcloud], max_ips: 10, idle_ttl: 1h }}
"
    )
}

#[test]
fn dynamic_json_is_the_traefik_file_as_json() {
    for (version, kind) in [(3, "ipAllowList"), (2, "ipWhiteList")] {
        let setup = setup_exact(&provider_policy(version));
        let daemon = setup.start();
        assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.5"), 200);
        assert_eq!(mirror(daemon.addr, "ha.example.com", "2001:db8:5::1"), 200);
        setup.wait_lists("both grants in the file", SOON, |l| {
            l["gatekeeper-immich"] == strings(&["203.0.113.5/32", "2001:db8:5::/64"])
        });

        let a = Request::new("GET", "/traefik/dynamic.json").send(daemon.addr);
        assert_eq!(a.status, 200, "v{version}: {a:?}");
        assert!(
            a.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "v{version}: {}",
            a.head
        );
        let json: Value = serde_json::from_str(&a.body)
            .unwrap_or_else(|e| panic!("v{version}: not JSON ({e}): {}", a.body));
        let yaml = std::fs::read_to_string(&setup.traefik).unwrap();
        let file = yaml_to_json(&yaml).unwrap();
        assert_eq!(
            json, file,
            "v{version}: JSON and file differ\nfile:\n{yaml}"
        );

        // And the content is what it should be, so the two are not equal by being both empty.
        let range = |name: &str| json["http"]["middlewares"][name][kind]["sourceRange"].clone();
        assert_eq!(
            range("gatekeeper-immich"),
            serde_json::json!(["203.0.113.5/32", "2001:db8:5::/64"]),
            "v{version}"
        );
        assert_eq!(
            range("gatekeeper-nextcloud"),
            serde_json::json!(["192.0.2.0/28", "203.0.113.5/32", "2001:db8:5::/64"]),
            "v{version}"
        );
        assert_eq!(
            range("gatekeeper-jellyfin"),
            serde_json::json!(["0.0.0.0/32"]),
            "v{version}: nobody allowed"
        );
        assert_eq!(
            json["http"]["middlewares"]["gatekeeper-jellyfin"][kind]["ipStrategy"],
            serde_json::json!({"depth": 1, "excludedIPs": ["10.0.0.0/8"]}),
            "v{version}"
        );
        assert_eq!(
            json["http"]["middlewares"].as_object().unwrap().len(),
            3,
            "v{version}"
        );
    }
}

/// Make every write of the state file fail from now on (a directory takes its place), once the
/// daemon has written it the first time.
fn break_state_file(setup: &Setup) {
    wait_for("the first state file", SOON, || read_state(&setup.state));
    std::fs::remove_file(&setup.state).unwrap();
    std::fs::create_dir(&setup.state).unwrap();
}

/// Grant `client` through `ha` while the state file cannot be written, and wait until the daemon
/// has tried (and failed) to write its outputs.
fn grant_unpersisted(setup: &Setup, daemon: &Daemon, client: &str) {
    assert_eq!(mirror(daemon.addr, "ha.example.com", client), 200);
    // Decisions come from memory: that is allowed, no proxy keeps them after a crash.
    assert_eq!(allow(daemon.addr, "immich", client), 200);
    wait_for("the failed output write", SOON, || {
        let log = daemon.log();
        if log.contains("cannot write outputs") {
            Ok(())
        } else {
            Err(log)
        }
    });
    assert!(
        !state_networks(&setup.state).is_ok_and(|s| s.contains(&format!("{client}/32"))),
        "the state file was written after all"
    );
}

#[test]
fn traefik_file_never_shows_a_grant_the_state_file_lacks() {
    let setup = Setup::new(DECISIONS);
    let daemon = setup.start();
    break_state_file(&setup);
    grant_unpersisted(&setup, &daemon, "203.0.113.5");
    // Traefik keeps whatever the file says after gatekeeper dies: it must not allow an address
    // that a restarted gatekeeper would not know.
    let lists = setup.lists();
    assert!(
        !lists["gatekeeper-immich"].contains(&"203.0.113.5/32".to_string()),
        "the Traefik file shows 203.0.113.5/32, which the state file lacks (its write failed): {lists:?}"
    );

    // Once the state file can be written again, both get the grant.
    std::fs::remove_dir(&setup.state).unwrap();
    setup.wait_lists("the grant after the repair", SOON, |l| {
        l["gatekeeper-immich"].contains(&"203.0.113.5/32".to_string())
    });
    assert!(
        state_networks(&setup.state)
            .unwrap()
            .contains("203.0.113.5/32")
    );
}

#[test]
fn dynamic_json_never_shows_a_grant_the_state_file_lacks() {
    let setup = Setup::new(DECISIONS);
    let daemon = setup.start();
    break_state_file(&setup);
    grant_unpersisted(&setup, &daemon, "203.0.113.5");
    // Traefik's HTTP provider keeps the last configuration it fetched while gatekeeper is down.
    let a = Request::new("GET", "/traefik/dynamic.json").send(daemon.addr);
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        !a.body.contains("203.0.113.5/32"),
        "/traefik/dynamic.json shows 203.0.113.5/32, which the state file lacks (its write failed): {}",
        a.body
    );
}
