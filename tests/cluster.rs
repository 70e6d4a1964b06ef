//! Several gatekeepers on one real Redis (`redis:` in the policy): grants and revocations made on
//! one replica decide on the others within a second, `max_ips` holds cluster-wide under concurrent
//! grants, expiry needs no request, and a Redis outage is survived (decisions from memory, health
//! says so, state converges once Redis is back).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::redis::Redis;
use common::upstream::{Request, allow_status};
use common::*;

const TOKEN: &str = "cluster-test-admin-token";
const SECOND: Duration = Duration::from_secs(1);

/// One replica: its own directory, Traefik file and ports, the shared Redis.
struct Replica {
    setup: Setup,
    daemon: Daemon,
    admin: SocketAddr,
}

fn policy(redis: &Redis, max_ips: usize, extra: &str) -> String {
    format!(
        "trusted_proxies: [127.0.0.1/32]\n\
         redis: {{ url: \"{}\", key_prefix: gk-test }}\n\
         services:\n  immich: {{}}\n  nextcloud: {{}}\n\
         sources:\n  ha:\n    kind: mirror\n    hosts: [ha.example.com]\n    unlocks: \"*\"\n    max_ips: {max_ips}\n{extra}",
        redis.url()
    )
}

fn replica(body: &str) -> Replica {
    let setup = Setup::new(body);
    let daemon = Daemon::start(
        setup.dir.path(),
        &["--config", "gatekeeper.yaml"],
        &[("GATEKEEPER_ADMIN__TOKEN", TOKEN)],
    );
    let admin = daemon.admin_addr();
    Replica {
        setup,
        daemon,
        admin,
    }
}

/// Grant `client` by a mirrored request through `via`, and wait until `seen_on` decides it (SOON:
/// a liveness bound; how fast is the business of the one test named "within a second").
fn grant_seen(via: SocketAddr, seen_on: SocketAddr, client: &str) {
    assert_eq!(mirror(via, "ha.example.com", client), 200);
    allow_becomes(seen_on, client, 200, SOON);
}

/// A Redis and two replicas A and B on it (`max_ips`, `extra` source lines), with `client`
/// granted through A's mirror and already decided on B.
fn granted_on_two(max_ips: usize, extra: &str, client: &str) -> (Redis, Replica, Replica) {
    let redis = Redis::start();
    let body = policy(&redis, max_ips, extra);
    let a = replica(&body);
    let b = replica(&body);
    grant_seen(a.daemon.addr, b.daemon.addr, client);
    (redis, a, b)
}

fn admin_request(admin: SocketAddr, method: &str, target: &str, body: &str) -> (u16, String) {
    let bearer = format!("Bearer {TOKEN}");
    let r = http(admin, method, target, &[("Authorization", &bearer)], body);
    (r.status, r.body)
}

/// Wait at most `within` for `/allow/{service}` of `client` on `addr` to answer `status`;
/// returns how long it took.
fn allow_becomes(addr: SocketAddr, client: &str, status: u16, within: Duration) -> Duration {
    let start = Instant::now();
    wait_for(
        &format!("/allow/immich for {client} on {addr} to answer {status}"),
        within,
        || {
            let got = allow_status(addr, "immich", client);
            (got == status).then_some(()).ok_or(got.to_string())
        },
    );
    start.elapsed()
}

/// `gatekeeper_grants_total{source="ha"}` of one replica: the new grants it made.
fn grants_made(admin: SocketAddr) -> u64 {
    let body = Request::new("GET", "/metrics").send(admin).body;
    body.lines()
        .find_map(|l| l.strip_prefix("gatekeeper_grants_total{source=\"ha\"} "))
        .map_or(0, |v| v.trim().parse().unwrap_or(0))
}

fn redis_entries(redis: &Redis) -> Vec<String> {
    let mut v: Vec<String> = redis
        .cli(&["ZRANGE", "gk-test:ha:seen", "0", "-1"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Change messages, not the periodic full read, carry a change to the other replicas: with
/// `resync_every: 1h` nothing else could bring it within the test (waits are liveness bounds).
#[test]
fn a_grant_on_one_replica_and_a_revoke_on_the_other_decide_everywhere_by_change_messages() {
    let redis = Redis::start();
    let body = policy(&redis, 10, "").replace(
        "key_prefix: gk-test }",
        "key_prefix: gk-test, resync_every: 1h }",
    );
    let a = replica(&body);
    let b = replica(&body);

    let client = "198.51.100.7";
    assert_eq!(allow_status(b.daemon.addr, "immich", client), 403);
    assert_eq!(mirror(a.daemon.addr, "ha.example.com", client), 200);
    let took = allow_becomes(b.daemon.addr, client, 200, SOON);
    eprintln!("grant on A decided on B after {took:?}");
    assert_eq!(redis_entries(&redis), vec![format!("{client}/32")]);
    // B's Traefik file shows it too, and both files agree.
    b.setup
        .wait_lists("B's Traefik file to show A's grant", SOON, |l| {
            l["gatekeeper-immich"] == vec![format!("{client}/32")]
        });
    a.setup.wait_lists("A's Traefik file", SOON, |l| {
        l["gatekeeper-immich"] == vec![format!("{client}/32")]
    });

    // Revoked through B's admin API: A denies it.
    let (status, reply) =
        admin_request(b.admin, "DELETE", &format!("/api/v1/entries/{client}"), "");
    assert_eq!(status, 200, "{reply}");
    let took = allow_becomes(a.daemon.addr, client, 403, SOON);
    eprintln!("revoke on B decided on A after {took:?}");
    assert!(redis_entries(&redis).is_empty());
    a.setup
        .wait_lists("A's file to drop the revoked client", SOON, |l| {
            l["gatekeeper-immich"] == vec!["0.0.0.0/32".to_string()]
        });

    // An operator's grant on A is acknowledged only once Redis holds it.
    let (status, reply) = admin_request(
        a.admin,
        "POST",
        "/api/v1/entries",
        r#"{"source":"ha","address":"203.0.113.9","ttl":"1h"}"#,
    );
    assert_eq!(status, 201, "{reply}");
    assert_eq!(redis_entries(&redis), vec!["203.0.113.9/32".to_string()]);
    allow_becomes(b.daemon.addr, "203.0.113.9", 200, SOON);
    // Each grant is logged once, by the replica that made it.
    let grants_logged = |r: &Replica| {
        r.daemon
            .log()
            .lines()
            .filter(|l| l.contains(" granted") && l.contains("network=198.51.100.7/32"))
            .count()
    };
    wait_for("A's grant line", SOON, || {
        (grants_logged(&a) == 1).then_some(()).ok_or(a.daemon.log())
    });
    assert_eq!(grants_logged(&b), 0, "B:\n{}", b.daemon.log());
}

#[test]
fn max_ips_holds_cluster_wide_under_concurrent_grants() {
    let redis = Redis::start();
    let body = policy(&redis, 4, "");
    let a = replica(&body);
    let b = replica(&body);
    let addrs = [a.daemon.addr, b.daemon.addr];
    let admins = [a.admin, b.admin];

    // 50 operator grants for different clients, half on each replica, all released at once.
    // Each is acknowledged only once Redis holds it, so the test knows when each was sent and
    // acknowledged.
    let grants: Vec<(String, Instant, Instant)> = at_once(50, move |i| {
        let client = format!("198.51.100.{}", i + 1);
        let sent = Instant::now();
        // From eight loopback addresses: the admin listener gives each peer 16 connections.
        let from = std::net::IpAddr::from([127, 0, 0, 2 + (i % 8) as u8]);
        let bearer = format!("Bearer {TOKEN}");
        let r = http_from(
            from,
            admins[i % 2],
            "POST",
            "/api/v1/entries",
            &[("Authorization", &bearer)],
            &format!(r#"{{"source":"ha","address":"{client}"}}"#),
        );
        let (status, reply) = (r.status, r.body);
        // 201, or 409 when newer grants already evicted it again before the answer: either
        // way Redis took it.
        assert!(
            status == 201 || (status == 409 && reply.contains("evicted")),
            "{client}: {status} {reply}"
        );
        (format!("{client}/32"), sent, Instant::now())
    });
    let first: Vec<String> = grants.iter().map(|g| g.0.clone()).collect();

    // Exactly four remain in Redis, and both replicas converge on the same four.
    let survivors = redis_entries(&redis);
    assert_eq!(survivors.len(), 4, "{survivors:?}");
    wait_allowed_exactly(&addrs, &first, &survivors);
    // The four most recently seen: no evicted grant was sent after a survivor was acknowledged
    // (that survivor would then certainly be older than it).
    for (net, sent, _) in grants.iter().filter(|g| !survivors.contains(&g.0)) {
        for (kept, _, acked) in grants.iter().filter(|g| survivors.contains(&g.0)) {
            assert!(
                sent <= acked,
                "{net} (evicted) was granted after {kept} (kept) was acknowledged"
            );
        }
    }

    // The same through the mirror path, whose 200 does not wait for the grant: 50 new clients at
    // once, half through each replica. Once the scripts have run, exactly four remain and they
    // are all from this newer batch (every earlier grant was less recently seen).
    let mirrored: Vec<String> = at_once(50, move |i| {
        let client = format!("198.51.101.{}", i + 1);
        assert_eq!(mirror(addrs[i % 2], "ha.example.com", &client), 200);
        format!("{client}/32")
    });
    // Every mirror 200 came before its grant: wait until both replicas have counted all 100 new
    // grants (50 by the API, 50 mirrored), then read what Redis kept.
    wait_for("all 100 grants to be made", SOON, || {
        let made: u64 = admins.iter().map(|a| grants_made(*a)).sum();
        (made == 100).then_some(()).ok_or(made.to_string())
    });
    let survivors = redis_entries(&redis);
    assert!(
        survivors.len() == 4 && survivors.iter().all(|n| n.starts_with("198.51.101.")),
        "{survivors:?}"
    );
    let everyone: Vec<String> = mirrored.into_iter().chain(first).collect();
    wait_allowed_exactly(&addrs, &everyone, &survivors);
}

/// Run `f(0)` … `f(n - 1)` on `n` threads released together by a barrier; their results in order.
fn at_once<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize) -> T + Send + Sync + Copy + 'static,
) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                f(i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Wait (SOON each, a liveness bound) until every replica at `addrs` allows, of the `candidates`
/// (networks), exactly `expected` (sorted).
fn wait_allowed_exactly(addrs: &[SocketAddr], candidates: &[String], expected: &[String]) {
    for &addr in addrs {
        wait_for("the replica to allow exactly the survivors", SOON, || {
            let mut allowed: Vec<String> = candidates
                .iter()
                .filter(|net| allow_status(addr, "immich", net.trim_end_matches("/32")) == 200)
                .cloned()
                .collect();
            allowed.sort();
            (allowed == expected)
                .then_some(())
                .ok_or(format!("{allowed:?} vs {expected:?}"))
        });
    }
}

#[test]
fn expiry_needs_no_request_on_any_replica() {
    let (redis, a, b) = granted_on_two(10, "    idle_ttl: 2s\n", "198.51.100.20");
    // Nobody sends anything; within idle_ttl + the expiry tick + a resync, all forget it.
    let start = Instant::now();
    // SOON only catches an entry that never expires; the timing asserted is the lower bound.
    wait_for("Redis to drop the idle entry", SOON, || {
        let e = redis_entries(&redis);
        e.is_empty().then_some(()).ok_or(format!("{e:?}"))
    });
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "expired too early"
    );
    for r in [&a, &b] {
        allow_becomes(r.daemon.addr, "198.51.100.20", 403, SOON);
    }
    // One replica removed it and logged it; expiry is logged once across the cluster.
    let logged = || {
        [&a, &b]
            .iter()
            .filter(|r| r.daemon.log().contains("expired (idle)"))
            .count()
    };
    wait_for("the expiry in a log", SOON, || {
        (logged() >= 1).then_some(()).ok_or(logged().to_string())
    });
    // Give a second replica time to (wrongly) log it too.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        logged(),
        1,
        "A:\n{}\nB:\n{}",
        a.daemon.log(),
        b.daemon.log()
    );
}

#[test]
fn redis_outage_keeps_decisions_reports_it_and_converges_after() {
    let (mut redis, a, b) = granted_on_two(10, "", "198.51.100.30");
    assert_eq!(health(a.admin).0, 200);

    redis.stop();
    for r in [&a, &b] {
        wait_for("/healthz to report the outage", SOON, || {
            let (status, body) = health(r.admin);
            (status == 503 && body.contains("redis"))
                .then_some(())
                .ok_or(format!("{status} {body}"))
        });
        let metrics = Request::new("GET", "/metrics").send(r.admin).body;
        assert!(metrics.contains("gatekeeper_redis_up 0"), "{metrics}");
        // Decisions keep coming from the last copy.
        assert_eq!(allow_status(r.daemon.addr, "immich", "198.51.100.30"), 200);
        assert_eq!(allow_status(r.daemon.addr, "immich", "198.51.100.31"), 403);
    }
    // A new grant is refused rather than buffered: not admitted anywhere.
    assert_eq!(
        mirror(a.daemon.addr, "ha.example.com", "198.51.100.31"),
        200
    );
    let (status, _) = admin_request(
        b.admin,
        "POST",
        "/api/v1/entries",
        r#"{"source":"ha","address":"198.51.100.32"}"#,
    );
    assert_eq!(status, 503);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(allow_status(a.daemon.addr, "immich", "198.51.100.31"), 403);
    // A revocation during the outage applies at once where it was made, and reaches Redis later.
    let (status, reply) = admin_request(b.admin, "DELETE", "/api/v1/entries/198.51.100.30", "");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(allow_status(b.daemon.addr, "immich", "198.51.100.30"), 403);

    // Redis comes back empty (no persistence): both replicas reconnect without a restart, the
    // copies go back in, the revocation made during the outage wins, and they agree again.
    redis.start_again();
    for r in [&a, &b] {
        wait_health(r.admin, 200, SOON);
    }
    for r in [&a, &b] {
        allow_becomes(r.daemon.addr, "198.51.100.30", 403, SOON);
    }
    assert!(
        redis_entries(&redis).is_empty(),
        "{:?}",
        redis_entries(&redis)
    );
    // New grants flow again.
    grant_seen(b.daemon.addr, a.daemon.addr, "198.51.100.33");
    assert_eq!(redis_entries(&redis), vec!["198.51.100.33/32".to_string()]);
}

#[test]
fn a_replica_that_starts_later_reads_the_ledger_before_deciding() {
    let redis = Redis::start();
    let body = policy(&redis, 10, "");
    let a = replica(&body);
    grant_seen(a.daemon.addr, a.daemon.addr, "198.51.100.40");
    // No state file is written in shared mode.
    assert!(!a.setup.state.exists());
    let b = replica(&body);
    // Its first decision already knows the grant (it waits for the first read before listening).
    assert_eq!(allow_status(b.daemon.addr, "immich", "198.51.100.40"), 200);
    assert!(b.daemon.log().contains("ledger read from the shared store"));
}

#[test]
fn a_flushed_redis_gets_the_replicas_copies_back() {
    let (redis, a, b) = granted_on_two(10, "", "198.51.100.50");
    // Emptied without a dropped connection (FLUSHALL, a failover to an empty replica): no
    // replica adopts the empty ledger; the next resync notices and puts the copies back.
    assert_eq!(redis.cli(&["FLUSHALL"]).trim(), "OK");
    wait_for("the grant to be back in Redis", SOON, || {
        let e = redis_entries(&redis);
        (e == vec!["198.51.100.50/32".to_string()])
            .then_some(())
            .ok_or(format!("{e:?}"))
    });
    for r in [&a, &b] {
        assert_eq!(allow_status(r.daemon.addr, "immich", "198.51.100.50"), 200);
    }
    wait_for("the re-seed in a log", SOON, || {
        let (la, lb) = (a.daemon.log(), b.daemon.log());
        (la.contains("came back without its data") || lb.contains("came back without its data"))
            .then_some(())
            .ok_or(format!("A:\n{la}\nB:\n{lb}"))
    });
}

#[test]
fn a_replica_started_while_redis_is_down_denies_then_joins() {
    let mut redis = Redis::start();
    let body = policy(&redis, 10, "");
    redis.stop();
    let a = replica(&body);
    assert!(a.daemon.log().contains("shared store not reachable yet"));
    let (status, body_text) = health(a.admin);
    assert!(
        status == 503 && body_text.contains("redis"),
        "{status} {body_text}"
    );
    // Nothing is known, so nobody is allowed, and a new grant is refused rather than kept.
    assert_eq!(
        mirror(a.daemon.addr, "ha.example.com", "198.51.100.60"),
        200
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(allow_status(a.daemon.addr, "immich", "198.51.100.60"), 403);

    redis.start_again();
    wait_health(a.admin, 200, SOON);
    grant_seen(a.daemon.addr, a.daemon.addr, "198.51.100.60");
    assert_eq!(redis_entries(&redis), vec!["198.51.100.60/32".to_string()]);
}

#[test]
fn a_lowered_max_ips_on_reload_trims_the_shared_ledger() {
    let redis = Redis::start();
    let a = replica(&policy(&redis, 4, ""));
    let b = replica(&policy(&redis, 4, ""));
    for i in 1..=4 {
        grant_seen(a.daemon.addr, b.daemon.addr, &format!("198.51.100.7{i}"));
    }
    // Every replica gets the new policy (the file changes; its content poll picks it up).
    for r in [&a, &b] {
        std::fs::write(
            &r.setup.policy,
            format!("{PREAMBLE}{}", policy(&redis, 2, "")),
        )
        .unwrap();
    }
    // Redis keeps the two most recently seen, and both replicas agree.
    wait_for("Redis trimmed to two", SOON, || {
        let e = redis_entries(&redis);
        (e == vec![
            "198.51.100.73/32".to_string(),
            "198.51.100.74/32".to_string(),
        ])
        .then_some(())
        .ok_or(format!("{e:?}"))
    });
    for r in [&a, &b] {
        allow_becomes(r.daemon.addr, "198.51.100.71", 403, SOON);
        allow_becomes(r.daemon.addr, "198.51.100.72", 403, SOON);
        assert_eq!(allow_status(r.daemon.addr, "immich", "198.51.100.74"), 200);
    }
}

/// Write an entry into the shared ledger behind the replicas' backs, as a broken or hostile
/// writer could: `seen` score, `meta` text and `hits` text as given.
fn plant(redis: &Redis, network: &str, seen: u128, meta: &str, hits: &str) {
    redis.cli(&["ZADD", "gk-test:ha:seen", &seen.to_string(), network]);
    redis.cli(&["HSET", "gk-test:ha:meta", network, meta]);
    redis.cli(&["HSET", "gk-test:ha:hits", network, hits]);
}

/// Make every replica read the ledger again (as after another replica's change).
fn announce_change(redis: &Redis) {
    redis.cli(&["PUBLISH", "gk-test:changes", "test"]);
}

fn meta_since(first_seen: u128) -> String {
    format!(r#"{{"first_seen":"{first_seen}"}}"#)
}

#[test]
fn malformed_entries_in_redis_are_skipped_and_logged_once_and_the_rest_still_syncs() {
    let redis = Redis::start();
    let a = replica(&policy(&redis, 10, "    max_age: 1h\n"));
    wait_health(a.admin, 200, SOON);
    let now = now_millis();
    plant(&redis, "203.0.113.10/32", now, &meta_since(now), "3");
    plant(&redis, "203.0.113.11/32", now, &meta_since(now), "lots");
    plant(&redis, "203.0.113.12/32", now, "not json", "1");
    plant(
        &redis,
        "203.0.113.13/32",
        now,
        r#"{"first_seen":"soon"}"#,
        "1",
    );
    let until_never = format!(r#"{{"first_seen":"{now}","until":"never"}}"#);
    plant(&redis, "203.0.113.14/32", now, &until_never, "1");
    plant(&redis, "203.0.113.15/32", now, "[1,2]", "1");
    announce_change(&redis);

    // The readable entry is taken, the others are not, and Redis still counts as up.
    allow_becomes(a.daemon.addr, "203.0.113.10", 200, SOON);
    for bad in 11..=15 {
        assert_eq!(
            allow_status(a.daemon.addr, "immich", &format!("203.0.113.{bad}")),
            403
        );
    }
    // Expiry (with max_age) and refreshes run every second on the same entries: still healthy.
    wait_for("two expiry ticks", SOON, || {
        let (status, body) = health(a.admin);
        assert_eq!(status, 200, "{body}\n{}", a.daemon.log());
        let log = a.daemon.log();
        (log.contains("203.0.113.15/32")).then_some(()).ok_or(log)
    });
    std::thread::sleep(2 * SECOND);
    let (status, body) = health(a.admin);
    assert_eq!(status, 200, "{body}\n{}", a.daemon.log());

    // More reads (a later planted entry shows they happened) log each bad entry only once.
    plant(
        &redis,
        "203.0.113.16/32",
        now_millis(),
        &meta_since(now),
        "1",
    );
    announce_change(&redis);
    allow_becomes(a.daemon.addr, "203.0.113.16", 200, SOON);
    let log = a.daemon.log();
    for bad in 11..=15 {
        let net = format!("entry=203.0.113.{bad}/32");
        assert_eq!(
            log.lines().filter(|l| l.contains(&net)).count(),
            1,
            "{net}:\n{log}"
        );
    }

    // Clients behind broken entries that prove trust again are granted (the script repairs).
    for bad in 11..=15 {
        let client = format!("203.0.113.{bad}");
        assert_eq!(mirror(a.daemon.addr, "ha.example.com", &client), 200);
        allow_becomes(a.daemon.addr, &client, 200, SOON);
    }
    // A new client too.
    grant_seen(a.daemon.addr, a.daemon.addr, "198.51.100.101");
    assert_eq!(health(a.admin).0, 200);
}

#[test]
fn networks_and_times_no_local_grant_could_make_are_never_taken_from_redis() {
    let redis = Redis::start();
    let a = replica(&format!(
        "always_allow: [192.0.2.0/24]\n{}",
        policy(&redis, 20, "")
    ));
    wait_health(a.admin, 200, SOON);
    let now = now_millis();
    let year = 365 * 24 * 3600 * 1000u128;
    let bad = [
        ("1.0.0.0/8", now, meta_since(now)),        // wider than /16
        ("2a00::/32", now, meta_since(now)),        // wider than /64
        ("0.0.0.0/0", now, meta_since(now)),        // everything
        ("127.0.0.1/32", now, meta_since(now)),     // the trusted proxy
        ("192.0.2.0/28", now, meta_since(now)),     // inside always_allow
        ("198.51.100.77/24", now, meta_since(now)), // host bits set: not what a grant writes
        ("203.0.113.20/32", now + 10 * year, meta_since(now)), // last seen far in the future
        ("203.0.113.21/32", now, meta_since(now + 10 * year)), // first seen far in the future
    ];
    for (network, seen, meta) in &bad {
        plant(&redis, network, *seen, meta, "1");
    }
    let good = [
        "203.0.113.22/32",
        "2a01:4f8:1:2::/64",
        "2a01:4f8:1:3::5/128",
    ];
    for network in good {
        plant(&redis, network, now, &meta_since(now), "1");
    }
    announce_change(&redis);

    allow_becomes(a.daemon.addr, "203.0.113.22", 200, SOON);
    let lists = a.setup.wait_lists("the planted entries", SOON, |l| {
        l["gatekeeper-immich"]
            .iter()
            .any(|n| n == "2a01:4f8:1:3::5/128")
    });
    let mut shown = lists["gatekeeper-immich"].clone();
    shown.retain(|n| n != "192.0.2.0/24");
    assert_eq!(
        shown,
        vec![
            "203.0.113.22/32",
            "2a01:4f8:1:2::/64",
            "2a01:4f8:1:3::5/128"
        ]
    );
    for client in [
        "1.2.3.4",
        "2a00::1",
        "8.8.8.8",
        "198.51.100.1",
        "203.0.113.20",
        "203.0.113.21",
    ] {
        assert_eq!(
            allow_status(a.daemon.addr, "immich", client),
            403,
            "{client}"
        );
    }
    let log = a.daemon.log();
    for (network, _, _) in &bad {
        assert!(
            log.contains(&format!("entry={network}")),
            "{network}:\n{log}"
        );
    }
    assert_eq!(health(a.admin).0, 200);
}
