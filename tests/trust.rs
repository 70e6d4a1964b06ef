//! What gatekeeper trusts by default and what it says about a policy that trusts too much: the
//! real binary, real sockets. (Issue 13, items 2, 3 and 14.)

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::*;

const SOURCES: &str = "services: { immich: {} }\n\
    sources:\n  ha: { kind: mirror, hosts: [ha.example.com], unlocks: '*', max_ips: 5, idle_ttl: 1h }\n";

/// The body after the harness's preamble (ports, state and Traefik file in the temp dir).
fn base(extra: &str) -> String {
    format!("{extra}{SOURCES}")
}

/// A mirrored request for ha.example.com sent from the loopback address `from`.
fn mirror_from(from: Ipv4Addr, addr: SocketAddr, client: &str) -> u16 {
    let mut stream = connect_from(IpAddr::V4(from), addr)
        .unwrap_or_else(|e| panic!("connect from {from} to {addr}: {e}"));
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: ha.example.com\r\nX-Forwarded-For: {client}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn check_warns_about_always_allow_overlapping_trusted_proxies_naming_both_keys() {
    let setup = Setup::new(&base(
        "trusted_proxies: [127.0.0.1/32, 172.16.0.0/12]\nalways_allow: [172.18.0.0/16]\n",
    ));
    let (status, out, _) = run(
        setup.dir.path(),
        &["check", "--config", "gatekeeper.yaml"],
        &[],
    );
    assert!(status.success(), "{out}");
    assert!(
        out.contains(
            "warning: always_allow[0]: `172.18.0.0/16` overlaps trusted_proxies[1] `172.16.0.0/12`: "
        ),
        "{out}"
    );
    // The daemon says it at start, at the default log level.
    let daemon = setup.start();
    let line = daemon.wait_log("overlaps trusted_proxies[1]");
    assert!(line.contains("WARN"), "{line}");
}

#[test]
fn a_reload_into_an_overlapping_policy_is_warned_about() {
    let setup = Setup::new(&base("trusted_proxies: [127.0.0.1/32]\n"));
    let daemon = setup.start();
    std::fs::write(
        &setup.policy,
        format!(
            "{PREAMBLE}{}",
            base("trusted_proxies: [127.0.0.1/32]\nalways_allow: [127.0.0.0/24]\n")
        ),
    )
    .unwrap();
    daemon.hangup();
    let line = daemon.wait_log("overlaps trusted_proxies[0]");
    assert!(
        line.contains("WARN") && line.contains("always_allow[0]"),
        "{line}"
    );
}

#[test]
fn shipped_policies_check_without_warnings() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for policy in [
        "gatekeeper.example.yaml",
        "deploy/gatekeeper.yaml",
        "deploy/gatekeeper.ha.yaml",
    ] {
        let (status, out, err) = run(root, &["check", "--config", policy], &[]);
        assert!(status.success(), "{policy}: {out}{err}");
        assert!(!out.contains("warning"), "{policy}:\n{out}");
    }
}

#[test]
fn a_mirrored_request_from_an_untrusted_peer_is_warned_once_naming_the_peer_and_the_key() {
    // No trusted_proxies: loopback is trusted by default, so be precise about which address.
    let setup = Setup::new(&base("trusted_proxies: [127.0.0.1/32]\n"));
    let daemon = setup.start();
    let stranger = Ipv4Addr::new(127, 0, 0, 2);
    assert_eq!(mirror_from(stranger, daemon.addr, "203.0.113.7"), 403);
    let line = daemon.wait_log("peer outside trusted_proxies");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("127.0.0.2"), "{line}");
    assert!(
        line.contains("add its address to trusted_proxies"),
        "{line}"
    );
    // Once per peer and interval: a second request (answered, then a trusted one whose grant is
    // logged after it) adds no second warning.
    assert_eq!(mirror_from(stranger, daemon.addr, "203.0.113.7"), 403);
    assert_eq!(
        mirror_from(Ipv4Addr::LOCALHOST, daemon.addr, "203.0.113.8"),
        200
    );
    daemon.wait_log("203.0.113.8/32");
    assert_eq!(
        daemon.log().matches("peer outside trusted_proxies").count(),
        1,
        "{}",
        daemon.log()
    );
    // Nothing from the stranger was granted.
    assert!(!daemon.log().contains("203.0.113.7/32"), "{}", daemon.log());
}

#[test]
fn an_admin_token_of_digits_works_and_is_never_echoed() {
    let setup = Setup::new(&base(""));
    let token = "000123456789012345678901234567890123456789";
    let daemon = Daemon::start(
        setup.dir.path(),
        &["--config", "gatekeeper.yaml"],
        &[("GATEKEEPER_ADMIN__TOKEN", token)],
    );
    let admin = daemon.admin_addr();
    let auth = format!("Bearer {token}");
    let ok = http(
        admin,
        "GET",
        "/api/v1/entries",
        &[("Authorization", auth.as_str())],
        "",
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    // Without the leading zeros it is another token.
    let trimmed = format!("Bearer {}", token.trim_start_matches('0'));
    let wrong = http(
        admin,
        "GET",
        "/api/v1/entries",
        &[("Authorization", trimmed.as_str())],
        "",
    );
    assert_eq!(wrong.status, 401, "{wrong:?}");

    // A token that cannot be text is refused without being shown.
    let bad = Setup::new(&base(""));
    std::fs::write(
        &bad.policy,
        format!("admin: {{ listen: 127.0.0.1:0, token: 31415.9265 }}\n{SOURCES}"),
    )
    .unwrap();
    let (status, out, err) = run(
        bad.dir.path(),
        &["check", "--config", "gatekeeper.yaml"],
        &[],
    );
    assert!(!status.success());
    assert!(err.contains("admin.token: expected text"), "{err}");
    assert!(!format!("{out}{err}").contains("31415"), "{out}{err}");
}

#[test]
fn a_client_inside_never_grant_is_warned_about_once_and_never_granted() {
    // The shipped compose layout: the proxy is trusted, the network's gateway (where Docker's
    // userland proxy connects from) is never granted.
    let setup = Setup::new(&base(
        "trusted_proxies: [127.0.0.1/32]\nnever_grant: [172.30.0.1/32]\n",
    ));
    let (status, out, _) = run(
        setup.dir.path(),
        &["check", "--config", "gatekeeper.yaml"],
        &[],
    );
    assert!(status.success(), "{out}");
    assert!(
        out.contains("never granted (each stands for many clients): 172.30.0.1/32"),
        "{out}"
    );
    let token = "never-grant-admin-token";
    let daemon = Daemon::start(
        setup.dir.path(),
        &["--config", "gatekeeper.yaml"],
        &[("GATEKEEPER_ADMIN__TOKEN", token)],
    );
    let proxy = Ipv4Addr::LOCALHOST;
    // The proxy's mirror gets its 200 whatever the client turned out to be.
    for _ in 0..2 {
        assert_eq!(mirror_from(proxy, daemon.addr, "172.30.0.1"), 200);
    }
    // The barrier: once this grant is in the Traefik file and the log, the two requests before
    // it have been handled and logged.
    assert_eq!(mirror_from(proxy, daemon.addr, "203.0.113.8"), 200);
    let lists = setup.wait_lists("the barrier grant", SOON, |l| {
        l["gatekeeper-immich"].contains(&"203.0.113.8/32".to_string())
    });
    assert_eq!(
        lists["gatekeeper-immich"],
        strings(&["203.0.113.8/32"]),
        "{lists:?}"
    );
    let networks: Vec<String> = setup
        .state_entries()
        .into_iter()
        .map(|e| e.network)
        .collect();
    assert_eq!(networks, strings(&["203.0.113.8/32"]));
    let log = daemon.wait_log("203.0.113.8/32");
    let warning = "client 172.30.0.1 is inside never_grant range 172.30.0.1/32";
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(warning)).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
    assert!(lines[0].contains("Docker's userland proxy"), "{}", lines[0]);

    // An operator cannot grant a network that holds it either.
    let admin = daemon.admin_addr();
    let auth = format!("Bearer {token}");
    let refused = http(
        admin,
        "POST",
        "/api/v1/entries",
        &[("Authorization", auth.as_str())],
        r#"{"source":"ha","address":"172.30.0.0/30"}"#,
    );
    assert_eq!(refused.status, 400, "{refused:?}");
    let error = refused.error();
    assert!(
        error.contains("172.30.0.0/30")
            && error.contains("overlaps never_grant range 172.30.0.1/32"),
        "{error}"
    );
    // Beside it is fine.
    let granted = http(
        admin,
        "POST",
        "/api/v1/entries",
        &[("Authorization", auth.as_str())],
        r#"{"source":"ha","address":"172.30.0.4/30"}"#,
    );
    assert_eq!(granted.status, 201, "{granted:?}");
    let networks: std::collections::BTreeSet<String> = setup
        .state_entries()
        .into_iter()
        .map(|e| e.network)
        .collect();
    assert_eq!(
        networks,
        ["172.30.0.4/30", "203.0.113.8/32"].map(String::from).into()
    );
}
