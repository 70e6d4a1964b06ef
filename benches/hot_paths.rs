//! criterion benches for the pure parts of the request paths (issue #6): the client-IP walk, the
//! snapshot lookups a known client and an allow decision make, the whole mirror decision of a
//! known client, and rendering the Traefik file. `cargo bench`; `scripts/bench` measures the
//! daemon end to end.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use gatekeeper::client_ip::ClientIp;
use gatekeeper::gate::Gate;
use gatekeeper::ledger::{Ledger, ServiceList, Snapshot, now_millis};
use gatekeeper::policy::{Policy, from_yaml_str};
use gatekeeper::sinks::traefik_file;
use gatekeeper::sources::mirror;
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

/// Three services and a mirror source with room for 20 clients; the default trusted proxies.
const POLICY: &str = "\
always_allow: [192.168.0.0/16]
services: { immich: {}, nextcloud: {}, jellyfin: { always_allow: [203.0.113.7] } }
sources:
  ha: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\", max_ips: 20, idle_ttl: 1h }
";

fn policy() -> Policy {
    from_yaml_str(POLICY, "bench").expect("the bench policy is valid")
}

/// The network of client `i` of the 20 the ledger holds: half IPv4 (/32), half IPv6 (/64).
fn network(i: u8) -> IpNet {
    if i % 2 == 0 {
        format!("198.51.100.{i}/32").parse().unwrap()
    } else {
        format!("2001:db8:{i}::/64").parse().unwrap()
    }
}

fn values(raw: &[&str]) -> Vec<HeaderValue> {
    raw.iter()
        .map(|v| HeaderValue::from_str(v).unwrap())
        .collect()
}

fn client_ip_walk(c: &mut Criterion) {
    let policy = policy();
    let resolver = ClientIp::new(
        policy.trusted_proxies.clone(),
        policy.all_always_allow(),
        policy.ipv6_prefix,
    );
    let proxy: IpAddr = "127.0.0.1".parse().unwrap();
    let shapes: [(&str, Vec<HeaderValue>); 4] = [
        ("one address", values(&["203.0.113.50"])),
        (
            "forged left part, two trusted hops",
            values(&["6.6.6.6, 203.0.113.50, 10.0.0.1, 172.16.0.2"]),
        ),
        (
            "IPv6 with port, two header values",
            values(&["[2001:db8:abcd::5]:443", "10.0.0.1"]),
        ),
        ("malformed", values(&["unknown, 10.0.0.1"])),
    ];
    let mut group = c.benchmark_group("client_ip");
    for (name, xff) in &shapes {
        group.bench_function(*name, |b| {
            b.iter(|| resolver.network_to_grant(black_box(proxy), black_box(xff)))
        });
    }
    group.finish();
}

fn snapshot_lookup(c: &mut Criterion) {
    let policy = policy();
    let mut ledger = Ledger::new(&policy);
    let now = now_millis();
    for i in 0..20 {
        ledger.record("ha", network(i), now, None);
    }
    let snapshot = ledger.snapshot(&policy);
    let known: IpNet = "198.51.100.10/32".parse().unwrap();
    let allowed: IpAddr = "2001:db8:13::77".parse().unwrap();
    let stranger: IpAddr = "203.0.113.99".parse().unwrap();
    let mut group = c.benchmark_group("snapshot");
    group.bench_function("live, known client", |b| {
        b.iter(|| snapshot.live(black_box("ha"), black_box(&known)).is_some())
    });
    group.bench_function("allows, listed client", |b| {
        b.iter(|| {
            snapshot
                .service("jellyfin")
                .unwrap()
                .allows(black_box(allowed))
        })
    });
    group.bench_function("allows, stranger", |b| {
        b.iter(|| {
            snapshot
                .service("jellyfin")
                .unwrap()
                .allows(black_box(stranger))
        })
    });
    group.finish();

    // The whole decision for a mirrored request of a known client, minus HTTP: the walk, the
    // network to grant, the lock-free refresh.
    let (gate, _) = Gate::new(policy, Vec::new());
    let active = gate.active();
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.50"));
    let proxy: IpAddr = "127.0.0.1".parse().unwrap();
    mirror::record(&gate, &active, "ha", proxy, &headers);
    c.bench_function("mirror::record, known client", |b| {
        b.iter(|| mirror::record(&gate, &active, "ha", black_box(proxy), black_box(&headers)))
    });
}

fn render(c: &mut Criterion) {
    let policy = policy();
    let allowed: Vec<IpNet> = (0..20).map(network).collect();
    let snapshot = Snapshot::from_services(
        ["immich", "jellyfin", "nextcloud"]
            .into_iter()
            .map(|name| ServiceList {
                name: name.into(),
                allowed: allowed.clone().into(),
            })
            .collect(),
    );
    c.bench_function("traefik_file::render, 3 services x 20 networks", |b| {
        b.iter(|| traefik_file::render(black_box(&snapshot), &policy.traefik, &policy.origin))
    });
}

criterion_group!(benches, client_ip_walk, snapshot_lookup, render);
criterion_main!(benches);
