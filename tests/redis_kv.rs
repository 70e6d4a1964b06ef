//! Traefik's KV (Redis) sink end to end, against a real `redis-server` started on a port the test
//! picks and the real binary: the keys, read back one by one, follow Traefik's documented layout
//! and hold exactly the Traefik file's lists; a shrinking list leaves no stale index; version 2
//! writes `ipWhiteList`; a Redis outage shows on `/healthz` while decisions go on, and a Redis
//! that comes back empty is rewritten without restarting gatekeeper; a reload that drops a
//! service or moves the URL is followed, and keys outside gatekeeper's prefix are never touched;
//! a revocation right before a SIGTERM still reaches Redis.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::redis::Redis;
use common::upstream::{Request, allow_status};
use common::*;

const TOKEN: &str = "5b1e0c7d-redis-kv-admin-token";

/// Three services (one with its own `always_allow`), one mirror source unlocking two of them,
/// Traefik's `ipStrategy.depth`, and both the file and the KV output.
fn policy(url: &str, version: u8, services: &str) -> String {
    format!(
        "\
listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
state_file: ./data/state.json
traefik:
  file: ./traefik/gatekeeper.yml
  version: {version}
  ip_strategy: {{ depth: 1 }}
  redis: {{ url: \"{url}\", root_key: traefik }}
services:
{services}sources:
  ha: {{ kind: mirror, hosts: [ha.example.com], unlocks: [immich, jellyfin], max_ips: 5, idle_ttl: 1h }}
"
    )
}

const SERVICES: &str =
    "  immich: {}\n  nextcloud: {}\n  jellyfin: { always_allow: [192.0.2.7/32] }\n";

fn setup(text: &str) -> Setup {
    let setup = Setup::new("");
    std::fs::write(&setup.policy, text).expect("write policy");
    setup
}

fn start(setup: &Setup) -> Daemon {
    Daemon::start(
        setup.dir.path(),
        &["--config", "gatekeeper.yaml"],
        &[("GATEKEEPER_ADMIN__TOKEN", TOKEN)],
    )
}

/// Every key under `traefik/` with its value, read key by key as Traefik's provider would (SCAN,
/// then GET each). Reading key by key is not atomic: a transaction landing halfway gives a mix of
/// before and after, or a key gone before its GET. So a read counts only when a second one right
/// after it found exactly the same.
fn read_kv(redis: &Redis) -> BTreeMap<String, String> {
    wait_for("two equal reads of the KV in a row", SOON, || {
        let first = read_kv_once(redis);
        let second = read_kv_once(redis);
        if first == second && first.values().all(Option::is_some) {
            Ok(first.into_iter().map(|(k, v)| (k, v.unwrap())).collect())
        } else {
            Err(format!("{first:?}\n{second:?}"))
        }
    })
}

/// One pass of SCAN and GET; `None` for a key gone before its GET.
fn read_kv_once(redis: &Redis) -> BTreeMap<String, Option<String>> {
    redis
        .cli(&["--scan", "--pattern", "traefik/*"])
        .lines()
        .filter(|k| !k.is_empty())
        .map(|key| {
            // --raw prints a missing key's nil as an empty line; gatekeeper never writes "".
            let value = redis.cli(&["GET", key]);
            let value = value.strip_suffix('\n').unwrap_or(&value);
            (
                key.to_string(),
                (!value.is_empty()).then(|| value.to_string()),
            )
        })
        .collect()
}

/// The `sourceRange` of every middleware in the KV layout, by name, in index order. An error
/// when a list has a gap (a stale index would be one past the end, so it shows as a longer list).
fn kv_lists(kv: &BTreeMap<String, String>) -> Result<Lists, String> {
    let mut by_index: BTreeMap<String, BTreeMap<usize, String>> = BTreeMap::new();
    for (key, value) in kv {
        let Some(rest) = key.strip_prefix("traefik/http/middlewares/") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        if let [name, "ipAllowList" | "ipWhiteList", "sourceRange", i] = parts[..] {
            let i: usize = i.parse().map_err(|_| format!("bad index in {key}"))?;
            by_index
                .entry(name.to_string())
                .or_default()
                .insert(i, value.clone());
        }
    }
    by_index
        .into_iter()
        .map(|(name, ranges)| {
            if ranges.keys().copied().ne(0..ranges.len()) {
                return Err(format!("{name} has indices {:?}", ranges.keys()));
            }
            Ok((name, ranges.into_values().collect()))
        })
        .collect()
}

/// Only gatekeeper's middlewares (the `gatekeeper-` prefix) of `lists`.
fn ours(lists: Lists) -> Lists {
    lists
        .into_iter()
        .filter(|(name, _)| name.starts_with("gatekeeper-"))
        .collect()
}

/// Wait until the KV satisfies `check`; the KV it last read.
fn wait_kv(
    redis: &Redis,
    what: &str,
    check: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    wait_for(what, SOON, || {
        let kv = read_kv(redis);
        if check(&kv) {
            Ok(kv)
        } else {
            Err(format!("{kv:#?}"))
        }
    })
}

/// Wait until the KV and the Traefik file hold the same (non-empty) lists; returns them.
fn wait_kv_equals_file(redis: &Redis, setup: &Setup, what: &str) -> Lists {
    wait_for(what, SOON, || {
        let file = read_lists(&setup.traefik)?;
        let kv = ours(kv_lists(&read_kv(redis))?);
        if kv == file && !kv.is_empty() {
            Ok(kv)
        } else {
            Err(format!("file: {file:?}\nkv:   {kv:?}"))
        }
    })
}

/// `traefik/http/middlewares/gatekeeper-{service}/{kind}/{rest}` → `value`, for building the
/// expected KV by hand from Traefik's documented layout.
fn entry(service: &str, kind: &str, rest: &str, value: &str) -> (String, String) {
    (
        format!("traefik/http/middlewares/gatekeeper-{service}/{kind}/{rest}"),
        value.to_string(),
    )
}

fn revoke(admin: SocketAddr, address: &str) {
    let a = Request::new("DELETE", &format!("/api/v1/entries/{address}"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .send(admin);
    assert_eq!(a.status, 200, "revoke {address}: {a:?}");
}

/// Keys that are not gatekeeper's: a router, a middleware without the prefix.
const FOREIGN: &[(&str, &str)] = &[
    (
        "traefik/http/routers/photos/rule",
        "Host(`photos.example.com`)",
    ),
    (
        "traefik/http/middlewares/office/ipAllowList/sourceRange/0",
        "198.18.0.0/15",
    ),
];

fn seed_foreign(redis: &Redis) {
    for (key, value) in FOREIGN {
        redis.cli(&["SET", key, value]);
    }
}

fn has_foreign(kv: &BTreeMap<String, String>) -> bool {
    FOREIGN
        .iter()
        .all(|(k, v)| kv.get(*k).map(String::as_str) == Some(*v))
}

#[test]
fn keys_follow_traefiks_layout_and_equal_the_file() {
    let redis = Redis::start();
    seed_foreign(&redis);
    // Left by an earlier run: a middleware of a service since removed, and an index past the end
    // of a list that has since shrunk.
    let gone = "traefik/http/middlewares/gatekeeper-photos/ipAllowList/sourceRange/0";
    let stale = "traefik/http/middlewares/gatekeeper-immich/ipAllowList/sourceRange/4";
    redis.cli(&["SET", gone, "203.0.113.99/32"]);
    redis.cli(&["SET", stale, "203.0.113.98/32"]);

    let setup = setup(&policy(&redis.url(), 3, SERVICES));
    let daemon = start(&setup);
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.5"), 200);
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.23"), 200);
    setup.wait_lists("both clients in the Traefik file", SOON, |l| {
        l.get("gatekeeper-immich").is_some_and(|r| r.len() == 2)
    });

    let a = "ipAllowList";
    let mut expected: BTreeMap<String, String> = [
        entry("immich", a, "sourceRange/0", "198.51.100.23/32"),
        entry("immich", a, "sourceRange/1", "203.0.113.5/32"),
        entry("immich", a, "ipStrategy/depth", "1"),
        entry("jellyfin", a, "sourceRange/0", "192.0.2.7/32"),
        entry("jellyfin", a, "sourceRange/1", "198.51.100.23/32"),
        entry("jellyfin", a, "sourceRange/2", "203.0.113.5/32"),
        entry("jellyfin", a, "ipStrategy/depth", "1"),
        // Nobody may reach nextcloud: the file sink's sentinel, never an empty list.
        entry("nextcloud", a, "sourceRange/0", "0.0.0.0/32"),
        entry("nextcloud", a, "ipStrategy/depth", "1"),
    ]
    .into_iter()
    .collect();
    expected.extend(FOREIGN.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let kv = wait_kv(&redis, "the documented layout, nothing more", |kv| {
        *kv == expected
    });
    assert!(!kv.contains_key(gone) && !kv.contains_key(stale));

    let lists = wait_kv_equals_file(&redis, &setup, "the KV lists to equal the file's");
    assert_eq!(lists.len(), 3, "{lists:?}");
    assert_eq!(
        lists["gatekeeper-nextcloud"],
        strings(&["0.0.0.0/32"]),
        "{lists:?}"
    );
}

#[test]
fn stale_indices_go_when_a_list_shrinks() {
    let redis = Redis::start();
    let setup = setup(&policy(&redis.url(), 3, SERVICES));
    let mut daemon = start(&setup);
    let admin = daemon.admin_addr();
    let clients = ["203.0.113.5", "203.0.113.6", "203.0.113.7", "203.0.113.8"];
    for client in clients {
        assert_eq!(mirror(daemon.addr, "ha.example.com", client), 200);
    }
    let immich = |i: usize| {
        format!("traefik/http/middlewares/gatekeeper-immich/ipAllowList/sourceRange/{i}")
    };
    wait_kv(&redis, "four clients in immich", |kv| {
        kv.contains_key(&immich(3))
    });
    wait_kv_equals_file(&redis, &setup, "four clients, KV equal to the file");

    revoke(admin, "203.0.113.6");
    revoke(admin, "203.0.113.8");
    let kv = wait_kv(&redis, "immich down to two clients", |kv| {
        !kv.contains_key(&immich(2))
    });
    assert!(!kv.contains_key(&immich(3)), "{kv:#?}");
    assert_eq!(
        (kv[&immich(0)].as_str(), kv[&immich(1)].as_str()),
        ("203.0.113.5/32", "203.0.113.7/32")
    );
    let lists = wait_kv_equals_file(&redis, &setup, "two clients, KV equal to the file");
    assert_eq!(
        lists["gatekeeper-immich"],
        strings(&["203.0.113.5/32", "203.0.113.7/32"])
    );

    // Down to nobody: the sentinel alone at index 0.
    revoke(admin, "203.0.113.5");
    revoke(admin, "203.0.113.7");
    let kv = wait_kv(&redis, "immich down to the sentinel", |kv| {
        kv.get(&immich(0)).is_some_and(|r| r == "0.0.0.0/32")
    });
    assert!(!kv.contains_key(&immich(1)), "{kv:#?}");
    let lists = wait_kv_equals_file(&redis, &setup, "nobody, KV equal to the file");
    assert_eq!(lists["gatekeeper-immich"], strings(&["0.0.0.0/32"]));
    assert_eq!(
        lists["gatekeeper-jellyfin"],
        strings(&["192.0.2.7/32"]),
        "jellyfin keeps its own always_allow"
    );

    // A revocation right before a SIGTERM still reaches Redis before gatekeeper exits.
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.9"), 200);
    wait_kv(&redis, "the last client in immich", |kv| {
        kv.get(&immich(0)).is_some_and(|r| r == "203.0.113.9/32")
    });
    revoke(admin, "203.0.113.9");
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{status}\n{log}");
    let kv = read_kv(&redis);
    assert_eq!(kv[&immich(0)], "0.0.0.0/32", "{kv:#?}\n{log}");
}

#[test]
fn version_2_writes_ip_white_list() {
    let redis = Redis::start();
    let setup = setup(&policy(&redis.url(), 2, SERVICES));
    let daemon = start(&setup);
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.5"), 200);
    setup.wait_lists("the client in the Traefik file", SOON, |l| {
        l.get("gatekeeper-immich")
            .is_some_and(|r| r == &strings(&["203.0.113.5/32"]))
    });
    let lists = wait_kv_equals_file(&redis, &setup, "the KV lists to equal the file's");
    assert_eq!(lists["gatekeeper-immich"], strings(&["203.0.113.5/32"]));

    let kv = read_kv(&redis);
    assert_eq!(kv.len(), 7, "{kv:#?}");
    for key in kv.keys() {
        assert!(key.contains("/ipWhiteList/"), "{key}");
    }
    let w = "ipWhiteList";
    for (key, value) in [
        entry("immich", w, "sourceRange/0", "203.0.113.5/32"),
        entry("immich", w, "ipStrategy/depth", "1"),
        entry("nextcloud", w, "sourceRange/0", "0.0.0.0/32"),
    ] {
        assert_eq!(kv.get(&key), Some(&value), "{key} in {kv:#?}");
    }
}

#[test]
fn redis_outage_is_reported_while_decisions_go_on_and_an_empty_redis_is_rewritten() {
    let mut redis = Redis::start();
    let setup = setup(&policy(&redis.url(), 3, SERVICES));
    let mut daemon = start(&setup);
    let admin = daemon.admin_addr();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.5"), 200);
    wait_kv_equals_file(&redis, &setup, "the first client in the KV");
    wait_for("/healthz 200", SOON, || match health(admin) {
        (200, _) => Ok(()),
        other => Err(format!("{other:?}")),
    });

    redis.cli(&["SET", "marker", "1"]);
    redis.stop();
    let body = wait_for("/healthz 503 naming traefik.redis", SOON, || {
        match health(admin) {
            (503, body) if body.contains("traefik.redis") => Ok(body),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(body.contains(&redis.url()), "names the server: {body}");

    // Decisions come from memory: the known client passes, a new grant counts at once.
    assert_eq!(allow_status(daemon.addr, "immich", "203.0.113.5"), 200);
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.23"), 200);
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.23"), 200);
    assert_eq!(allow_status(daemon.addr, "immich", "198.51.100.24"), 403);
    setup.wait_lists("the new client in the Traefik file", SOON, |l| {
        l.get("gatekeeper-immich").is_some_and(|r| r.len() == 2)
    });
    assert_eq!(health(admin).0, 503, "still failing while Redis is down");

    // Back, empty: everything is written again, the grant made meanwhile included, and health
    // recovers, by itself and without restarting gatekeeper (SOON is the harness's liveness
    // deadline; a recovery left to the 30 s resync would still miss it).
    redis.start_again();
    // (gatekeeper may already be writing again, so only a key it never writes shows emptiness)
    assert_eq!(
        redis.cli(&["EXISTS", "marker"]),
        "0\n",
        "the restarted Redis is empty"
    );
    let lists = wait_kv_equals_file(&redis, &setup, "the KV rewritten after the restart");
    assert_eq!(
        lists["gatekeeper-immich"],
        strings(&["198.51.100.23/32", "203.0.113.5/32"])
    );
    assert_eq!(lists.len(), 3, "{lists:?}");
    wait_for("/healthz 200 again", SOON, || match health(admin) {
        (200, _) => Ok(()),
        other => Err(format!("{other:?}")),
    });

    let metrics = Request::new("GET", "/metrics").send(admin).body;
    for result in ["ok", "error"] {
        let line = format!(
            "gatekeeper_output_writes_total{{output=\"traefik_redis\",result=\"{result}\"}} "
        );
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }

    // Redis gone for good: a SIGTERM still ends gatekeeper, cleanly (`terminate` waits SOON for
    // the exit: a liveness bound that catches a shutdown stuck on the dead Redis).
    redis.stop();
    assert_eq!(mirror(daemon.addr, "ha.example.com", "198.51.100.99"), 200);
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{status}\n{log}");
}

#[test]
fn reload_drops_a_removed_services_keys_and_follows_a_new_url() {
    let redis = Redis::start();
    seed_foreign(&redis);
    let setup = setup(&policy(&redis.url(), 3, SERVICES));
    let daemon = start(&setup);
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.5"), 200);
    wait_kv_equals_file(&redis, &setup, "the KV lists to equal the file's");

    // jellyfin leaves the policy (the file is polled for changes).
    let without_jellyfin = "  immich: {}\n  nextcloud: {}\n";
    let text = policy(&redis.url(), 3, without_jellyfin).replace("immich, jellyfin", "immich");
    std::fs::write(&setup.policy, text).unwrap();
    let kv = wait_kv(&redis, "gatekeeper-jellyfin's keys gone", |kv| {
        !kv.keys().any(|k| k.contains("/gatekeeper-jellyfin/"))
    });
    assert!(has_foreign(&kv), "keys outside the prefix stay: {kv:#?}");
    let lists = wait_kv_equals_file(&redis, &setup, "two middlewares in KV and file");
    assert_eq!(lists.len(), 2, "{lists:?}");
    assert!(health(daemon.admin_addr()).0 == 200);

    // A new server: written there without a restart.
    let other = Redis::start();
    let text = policy(&other.url(), 3, without_jellyfin).replace("immich, jellyfin", "immich");
    std::fs::write(&setup.policy, text).unwrap();
    let lists = wait_kv_equals_file(&other, &setup, "the new Redis written");
    assert_eq!(lists["gatekeeper-immich"], strings(&["203.0.113.5/32"]));
}

#[test]
fn two_replicas_on_one_shared_ledger_converge_on_one_kv() {
    let redis = Redis::start();
    // Both replicas share the ledger and write the same KV: while grants and revocations come in
    // through both, each rewrites the middlewares from its own (briefly lagging) copy.
    let text = policy(&redis.url(), 3, SERVICES).replace(
        "sources:",
        &format!(
            "redis: {{ url: \"{}\", key_prefix: kv-test, resync_every: 1h }}\nsources:",
            redis.url()
        ),
    );
    let (sa, sb) = (setup(&text), setup(&text));
    let (a, b) = (start(&sa), start(&sb));
    let (admin_a, admin_b) = (a.admin_addr(), b.admin_addr());
    for i in 0..40u32 {
        let (addr, other_admin) = if i % 2 == 0 {
            (a.addr, admin_b)
        } else {
            (b.addr, admin_a)
        };
        assert_eq!(
            mirror(addr, "ha.example.com", &format!("198.51.100.{}", i + 1)),
            200
        );
        // Every third round, revoke an earlier client through the other replica, so lists
        // shrink as well as grow (max_ips 5 keeps them short).
        if i % 3 == 2 {
            let gone = format!("198.51.100.{}", i);
            let a = Request::new("DELETE", &format!("/api/v1/entries/{gone}"))
                .header("Authorization", format!("Bearer {TOKEN}"))
                .send(other_admin);
            assert!(a.status == 200 || a.status == 404, "revoke {gone}: {a:?}");
        }
    }
    // Once quiet (the last mirrored grants may still be on their way: the mirror 200 does not
    // wait), the shared ledger, both Traefik files and the KV hold the same lists, with no index
    // left over from a longer list.
    // Change messages must bring this about: the periodic full read (resync_every: 1h) never
    // comes within the test, so the wait is a liveness bound only.
    let (lists, shared) = wait_for("ledger, both files and the KV to agree", SOON, || {
        let mut shared: Vec<String> = redis
            .cli(&["ZRANGE", "kv-test:ha:seen", "0", "-1"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        shared.sort();
        let file_a = read_lists(&sa.traefik)?;
        let file_b = read_lists(&sb.traefik)?;
        let kv = ours(kv_lists(&read_kv(&redis))?);
        let mut immich = file_a.get("gatekeeper-immich").cloned().unwrap_or_default();
        immich.sort();
        if file_a == file_b && kv == file_a && immich == shared && !shared.is_empty() {
            Ok((file_a, shared))
        } else {
            Err(format!(
                "ledger: {shared:?}\nA: {file_a:?}\nB: {file_b:?}\nkv: {kv:?}"
            ))
        }
    });
    assert!(lists["gatekeeper-immich"].len() <= 5, "{lists:?}");
    for client in &shared {
        let ip = client.trim_end_matches("/32");
        assert_eq!(allow_status(a.addr, "immich", ip), 200);
        assert_eq!(allow_status(b.addr, "immich", ip), 200);
    }
}

/// A replica that starts reads the ledger from the shared store, then its KV sink writes: it must
/// write that ledger, never the empty one it had before reading it. (Found with two replicas of
/// deploy/compose.ha.yaml restarting under real Traefik: the first to start replaced the lists
/// with the deny-all sentinel, and the phone got 403 until the other wrote them back.)
#[test]
fn a_starting_replica_never_writes_the_kv_from_the_ledger_it_has_not_read_yet() {
    let redis = Redis::start();
    let text = policy(&redis.url(), 3, SERVICES).replace(
        "sources:",
        &format!(
            "redis: {{ url: \"{}\", key_prefix: kv-start }}\nsources:",
            redis.url()
        ),
    );
    let first = setup(&text);
    let a = start(&first);
    assert_eq!(mirror(a.addr, "ha.example.com", "198.51.100.1"), 200);
    let immich = "traefik/http/middlewares/gatekeeper-immich/ipAllowList/sourceRange/0";
    wait_kv(&redis, "the first grant in the KV", |kv| {
        kv.get(immich).map(String::as_str) == Some("198.51.100.1/32")
    });
    drop(a);

    // Every command Redis runs from here on.
    let log_path = first.dir.path().join("monitor.log");
    let log = std::fs::File::create(&log_path).expect("monitor log");
    let mut monitor = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "monitor"])
        .stdout(log)
        .spawn()
        .expect("redis-cli monitor");
    wait_for("MONITOR to start", SOON, || {
        let text = std::fs::read_to_string(&log_path).map_err(|e| e.to_string())?;
        if text.starts_with("OK") {
            Ok(())
        } else {
            Err(text)
        }
    });

    // A replica starts on the same Redis and makes its own first change.
    let second = setup(&text);
    let b = start(&second);
    assert_eq!(mirror(b.addr, "ha.example.com", "198.51.100.2"), 200);
    wait_kv(&redis, "both grants in the KV", |kv| {
        let mut list: Vec<&str> = kv
            .iter()
            .filter(|(k, _)| k.starts_with(&immich[..immich.len() - 1]))
            .map(|(_, v)| v.as_str())
            .collect();
        list.sort_unstable();
        list == ["198.51.100.1/32", "198.51.100.2/32"]
    });
    let _ = monitor.kill();
    let _ = monitor.wait();
    let commands = std::fs::read_to_string(&log_path).expect("monitor log");
    let dropped: Vec<&str> = commands
        .lines()
        .filter(|l| l.contains("gatekeeper-immich/"))
        .filter(|l| l.contains("\"DEL\"") || l.contains("0.0.0.0/32"))
        .collect();
    assert!(
        dropped.is_empty(),
        "the starting replica wrote the KV before it had the shared ledger:\n{}",
        dropped.join("\n")
    );
}
