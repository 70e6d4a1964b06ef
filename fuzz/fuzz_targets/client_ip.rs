//! The client-IP walk over arbitrary X-Forwarded-For values: never panics, and whatever it
//! grants is never inside a trusted proxy or always_allow range.
#![no_main]

use std::net::IpAddr;

use gatekeeper::client_ip::ClientIp;
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fuzz_target!(|data: &[u8]| {
    let trusted = nets(&[
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "::1/128",
        "fc00::/7",
    ]);
    let always = nets(&["192.168.0.0/16", "203.0.113.7/32"]);
    let prefix = 40 + data.first().copied().unwrap_or(0) % 89;
    let resolver = ClientIp::new(trusted.clone(), always.clone(), prefix);
    // The first byte picks the peer; the rest is split into header values at NUL bytes.
    let peers: [IpAddr; 4] = [
        "10.0.0.2".parse().unwrap(),
        "::ffff:10.0.0.2".parse().unwrap(),
        "198.51.100.1".parse().unwrap(),
        "::1".parse().unwrap(),
    ];
    let peer = peers[data.get(1).copied().unwrap_or(0) as usize % peers.len()];
    let values: Vec<http::HeaderValue> = data
        .get(2..)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|v| http::HeaderValue::from_bytes(v).ok())
        .collect();
    if let Ok(net) = resolver.network_to_grant(peer, values.iter()) {
        for r in trusted.iter().chain(&always) {
            assert!(
                !r.contains(&net.network()) && !net.contains(&r.network()),
                "granted {net}, which overlaps {r}"
            );
        }
        assert!(
            resolver.is_trusted(peer),
            "granted through an untrusted peer {peer}"
        );
    }
});
