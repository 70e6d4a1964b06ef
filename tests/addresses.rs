//! Addresses that stand for someone else's, end to end through the real binary: clients inside
//! the IPv6 translation prefixes (NAT64 `64:ff9b::/96` and `64:ff9b:1::/48`, Teredo `2001::/32`)
//! are granted their address alone and judged by the IPv4 address they embed, and an operator's
//! IPv4 range written IPv4-mapped (`::ffff:a.b.c.d/n`) is judged, stored and rendered as IPv4.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::*;

const TOKEN: &str = "0c1f5e2d-addresses-admin-token";

/// Loopback (where the tests send from) and 10.0.0.0/8 are trusted; 198.51.100.0/24 is
/// always allowed.
const POLICY: &str = "\
trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]
always_allow: [198.51.100.0/24]
services: { immich: {} }
sources:
  ha: { kind: mirror, hosts: [ha.example.com], unlocks: '*', max_ips: 50, idle_ttl: 1h }
";

/// The daemon on [`POLICY`], its API open with [`TOKEN`].
fn start(setup: &Setup) -> (Daemon, SocketAddr) {
    let daemon = Daemon::start(
        setup.dir.path(),
        &["--config", "gatekeeper.yaml"],
        &[("GATEKEEPER_ADMIN__TOKEN", TOKEN)],
    );
    let admin = daemon.admin_addr();
    (daemon, admin)
}

/// `POST /api/v1/entries` granting `address` through `ha`.
fn grant(admin: SocketAddr, address: &str) -> Reply {
    http(
        admin,
        "POST",
        "/api/v1/entries",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        &format!(r#"{{"source":"ha","address":"{address}"}}"#),
    )
}

/// The `/allow/immich` status for a client forwarded by 127.0.0.1.
fn allow(daemon: &Daemon, client: &str) -> u16 {
    http(
        daemon.addr,
        "GET",
        "/allow/immich",
        &[("X-Forwarded-For", client)],
        "",
    )
    .status
}

fn immich(lists: &Lists) -> BTreeSet<&str> {
    lists["gatekeeper-immich"]
        .iter()
        .map(String::as_str)
        .collect()
}

#[test]
fn translated_clients_are_granted_their_address_alone_and_judged_by_the_ipv4_they_embed() {
    let setup = Setup::new(POLICY);
    let (daemon, _) = start(&setup);
    setup.wait_lists("the first Traefik file", SOON, |_| true);

    // Refused: the IPv4 address they embed is a trusted proxy, always allowed or link-local.
    for client in [
        "64:ff9b::10.1.2.3",
        "64:ff9b::198.51.100.7",
        "64:ff9b::169.254.1.1",
        "64:ff9b:1:2::a01:203",
        // Teredo clients 10.9.8.7 and 198.51.100.7 (the last 32 bits inverted).
        "2001:0:4136:e378:8000:63bf:f5f6:f7f8",
        "2001:0:4136:e378:8000:63bf:39cc:9bf8",
    ] {
        assert_eq!(
            mirror(daemon.addr, "ha.example.com", client),
            200,
            "{client}"
        );
    }
    // Granted, each its own address only.
    for client in [
        "64:ff9b::203.0.113.9",
        "64:ff9b:1:2::cb00:710a",
        // RFC 4380's example: client 192.0.2.45 behind server 65.54.227.120.
        "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:40000",
    ] {
        assert_eq!(
            mirror(daemon.addr, "ha.example.com", client),
            200,
            "{client}"
        );
    }
    // The barrier: once it is in the file, everything before it is too.
    assert_eq!(mirror(daemon.addr, "ha.example.com", "203.0.113.99"), 200);
    let lists = setup.wait_lists("the barrier grant", SOON, |l| {
        immich(l).contains("203.0.113.99/32")
    });
    assert_eq!(
        immich(&lists),
        BTreeSet::from([
            "198.51.100.0/24",
            "203.0.113.99/32",
            "64:ff9b::cb00:7109/128",
            "64:ff9b:1:2::cb00:710a/128",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2/128",
        ]),
        "{lists:?}"
    );
    let log = daemon.wait_log("a trusted proxy arrived as the client");
    assert!(log.contains("10.1.2.3"), "{log}");

    // Another client of the same translator or relay is someone else.
    for (client, status) in [
        ("64:ff9b::203.0.113.9", 200),
        ("64:ff9b::203.0.113.8", 403),
        ("64:ff9b::1.2.3.4", 403),
        ("64:ff9b:1:2::cb00:7109", 403),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", 200),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd3", 403),
    ] {
        assert_eq!(allow(&daemon, client), status, "{client}");
    }
}

#[test]
fn an_operators_translated_network_may_not_cover_other_people() {
    let setup = Setup::new(POLICY);
    let (_daemon, admin) = start(&setup);

    for (address, needles) in [
        ("64:ff9b::/96", &["64:ff9b::/96", "/112"][..]),
        ("64:ff9b::c600:0/104", &["64:ff9b::c600:0/104", "/112"]),
        ("64:ff9b:1::/64", &["64:ff9b:1::/64", "64:ff9b:1::/48"]),
        (
            "2001:0:4136:e378::/64",
            &["2001:0:4136:e378::/64", "2001::/32"],
        ),
        // The IPv4 ranges they embed: 10.1.2.0/24 (trusted), 198.51.100.0/24 (always allowed).
        ("64:ff9b::a01:200/120", &["10.1.2.0", "trusted"]),
        (
            "64:ff9b::c633:6400/120",
            &["198.51.100.0/24", "always_allow"],
        ),
    ] {
        let reply = grant(admin, address);
        assert_eq!(reply.status, 400, "{address}: {reply:?}");
        let error = reply.error();
        for needle in needles {
            assert!(error.contains(needle), "{address}: {error}");
        }
    }

    for (address, network) in [
        ("64:ff9b::cb00:7109/128", "64:ff9b::cb00:7109/128"),
        ("64:ff9b::cb00:7100/120", "64:ff9b::cb00:7100/120"),
    ] {
        let reply = grant(admin, address);
        assert_eq!(reply.status, 201, "{address}: {reply:?}");
        assert_eq!(reply.json()["network"], network);
    }
    let lists = setup.wait_lists("the translated grants", SOON, |l| {
        immich(l).contains("64:ff9b::cb00:7100/120")
    });
    assert_eq!(
        immich(&lists),
        BTreeSet::from([
            "198.51.100.0/24",
            "64:ff9b::cb00:7109/128",
            "64:ff9b::cb00:7100/120",
        ])
    );
}

#[test]
fn an_operators_mapped_ipv4_range_is_judged_as_ipv4() {
    let setup = Setup::new(POLICY);
    let (_daemon, admin) = start(&setup);

    for (address, needles) in [
        // 203.0.0.0/8.
        ("::ffff:203.0.0.0/104", &["203.0.0.0/8", "too wide"][..]),
        (
            "::ffff:198.51.100.0/120",
            &["198.51.100.0/24", "always_allow"],
        ),
        ("::ffff:10.1.0.0/112", &["10.1.0.0", "trusted"]),
        ("::ffff:127.0.0.1/128", &["127.0.0.1", "trusted"]),
        (
            "::ffff:0:0/95",
            &["::ffff:0.0.0.0/96", "::fffe:0:0/95", "ipv4"],
        ),
    ] {
        let reply = grant(admin, address);
        assert_eq!(reply.status, 400, "{address}: {reply:?}");
        let error = reply.error();
        for needle in needles {
            assert!(error.contains(needle), "{address}: {error}");
        }
    }
    // The first state file follows the start; under load it may come after the requests.
    let entries = wait_for("the first state file", SOON, || read_state(&setup.state));
    assert!(entries.is_empty(), "nothing was granted: {entries:?}");
}

#[test]
fn an_operators_mapped_ipv4_range_is_stored_and_rendered_as_ipv4() {
    let setup = Setup::new(POLICY);
    let (daemon, admin) = start(&setup);

    // The answer itself is checked by the next test; what is stored and rendered is checked here.
    let reply = grant(admin, "::ffff:203.0.113.0/120");
    assert_eq!(reply.status, 201, "{reply:?}");
    let lists = setup.wait_lists("the mapped grant", SOON, |l| immich(l).len() == 2);
    assert_eq!(
        immich(&lists),
        BTreeSet::from(["198.51.100.0/24", "203.0.113.0/24"])
    );
    assert_eq!(
        state_networks(&setup.state).unwrap(),
        BTreeSet::from(["203.0.113.0/24".to_string()])
    );
    assert_eq!(allow(&daemon, "203.0.113.77"), 200);
    assert_eq!(allow(&daemon, "::ffff:203.0.113.77"), 200);
}

#[test]
fn the_api_answers_and_revokes_a_mapped_range_in_its_ipv4_form() {
    let setup = Setup::new(POLICY);
    let (_daemon, admin) = start(&setup);

    let reply = grant(admin, "::ffff:203.0.113.0/120");
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.json()["network"], "203.0.113.0/24");

    let reply = http(
        admin,
        "DELETE",
        "/api/v1/entries/::ffff:203.0.113.0%2F120",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "",
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["removed"][0]["network"], "203.0.113.0/24");
}

#[test]
fn a_mapped_range_in_an_older_state_file_is_restored_as_ipv4() {
    let setup = Setup::new(POLICY);
    {
        let (mut daemon, admin) = start(&setup);
        assert_eq!(grant(admin, "203.0.113.0/24").status, 201);
        daemon.terminate();
    }
    // As an older version could have stored it.
    let state = std::fs::read_to_string(&setup.state).unwrap();
    assert!(state.contains("\"203.0.113.0/24\""), "{state}");
    std::fs::write(
        &setup.state,
        state.replace("\"203.0.113.0/24\"", "\"::ffff:203.0.113.0/120\""),
    )
    .unwrap();
    let (_daemon, _) = start(&setup);
    let lists = setup.wait_lists("the restored grant", SOON, |l| !immich(l).is_empty());
    assert_eq!(
        immich(&lists),
        BTreeSet::from(["198.51.100.0/24", "203.0.113.0/24"])
    );
}
