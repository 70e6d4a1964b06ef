//! `gatekeeper check`: every problem of a bad policy with its key and value, the router summary
//! of a good one, and errors that name the environment variable they came from.

mod common;

use common::*;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/gatekeeper.example.yaml");

/// Run `gatekeeper check` on `policy` (written to a temp dir) with `env`.
fn check(policy: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.yaml"), policy).unwrap();
    run(dir.path(), &["check", "--config", "bad.yaml"], env)
}

/// The `  - key: message` lines of a problem report.
fn problem_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- "))
        .collect()
}

fn assert_names(stderr: &str, key: &str, value: &str) {
    assert!(
        problem_lines(stderr)
            .iter()
            .any(|l| l.starts_with(&format!("{key}:")) && l.contains(value)),
        "no problem line for `{key}` naming `{value}` in:\n{stderr}"
    );
}

#[test]
fn check_reports_every_problem_with_its_key_and_value() {
    let (status, stdout, stderr) = check(
        "\
listen: \"nonsense:99999\"
admin: { listen: 127.0.0.1:5001 }
trusted_proxies: [10.0.0.0/8, not-a-cidr]
ipv6_prefix: 200
traefik: { version: 4, middleware_prefix: \"bad prefix!\" }
services:
  immich: { always_allow: [\"300.1.2.3/8\"] }
sources:
  a:
    kind: mirror
    hosts: [ha.example.com]
    unlocks: [immich, nosuch]
    max_ips: 0
    idle_ttl: forever
  b:
    kind: teleport
    unlocks: \"*\"
  c:
    kind: mirror
    hosts: [c.example.com]
    unlocks: \"*\"
    colour: blue
",
        &[],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    for (key, value) in [
        ("listen", "nonsense:99999"),
        ("trusted_proxies[1]", "not-a-cidr"),
        ("ipv6_prefix", "200"),
        ("traefik.version", "4"),
        ("traefik.middleware_prefix", "bad prefix!"),
        ("services.immich.always_allow[0]", "300.1.2.3/8"),
        ("sources.a.unlocks[1]", "nosuch"),
        ("sources.a.max_ips", "0"),
        ("sources.a.idle_ttl", "forever"),
        ("sources.b.kind", "teleport"),
        ("sources.c.colour", "colour"),
    ] {
        assert_names(&stderr, key, value);
    }
    assert!(stderr.contains("bad.yaml has 11 problems"), "{stderr}");
}

#[test]
fn a_type_error_in_one_key_does_not_hide_the_other_problems() {
    // `idle_ttl: 5` (a number, not a duration) is an easy mistake; the other two problems must
    // still be listed, each under its key path.
    let (status, _, stderr) = check(
        "\
listen: nonsense
services: { immich: {} }
sources:
  a: { kind: mirror, hosts: [ha.example.com], unlocks: \"*\", max_ips: 0, idle_ttl: 5 }
",
        &[],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_names(&stderr, "listen", "nonsense");
    assert_names(&stderr, "sources.a.max_ips", "0");
    assert_names(&stderr, "sources.a.idle_ttl", "5");
}

#[test]
fn check_on_the_example_policy_prints_the_middlewares_routers_reference() {
    let cwd = tempfile::tempdir().unwrap();
    let (status, stdout, stderr) = run(cwd.path(), &["check", "--config", EXAMPLE], &[]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    for middleware in [
        "gatekeeper-immich@file",
        "gatekeeper-nextcloud@file",
        "gatekeeper-jellyfin@file",
    ] {
        assert!(
            stdout.contains(middleware),
            "{middleware} missing from:\n{stdout}"
        );
    }
    assert!(stdout.contains("is valid"), "{stdout}");
    assert_eq!(
        names_in(cwd.path()),
        Vec::<String>::new(),
        "check must not write anything"
    );
}

#[test]
fn env_override_problem_names_the_variable() {
    let cwd = tempfile::tempdir().unwrap();
    let var = "GATEKEEPER_SOURCES__HOME-ASSISTANT__MAX_IPS";
    let (status, _, stderr) = run(
        cwd.path(),
        &["check", "--config", EXAMPLE],
        &[(var, "lots")],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_names(&stderr, "sources.home-assistant.max_ips", "lots");
    assert!(
        stderr.contains(&format!("environment variable {var}")),
        "{stderr}"
    );
}

#[test]
fn env_override_of_the_wrong_type_names_the_variable() {
    let cwd = tempfile::tempdir().unwrap();
    let var = "GATEKEEPER_TRAEFIK__VERSION";
    let (status, _, stderr) = run(
        cwd.path(),
        &["check", "--config", EXAMPLE],
        &[(var, "three")],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("three"), "{stderr}");
    assert!(
        stderr.contains(var),
        "the message does not name {var}:\n{stderr}"
    );
}

#[test]
fn check_and_render_on_the_several_nodes_policy() {
    let cwd = tempfile::tempdir().unwrap();
    let ha = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gatekeeper.ha.yaml");
    let (status, stdout, stderr) = run(cwd.path(), &["check", "--config", ha], &[]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    // Traefik reads the middlewares from its Redis provider, and no state file is used.
    assert!(stdout.contains("gatekeeper-immich@redis"), "{stdout}");
    assert!(
        stdout.contains("traefik KV       redis://valkey:6379/0 under traefik/http/middlewares"),
        "{stdout}"
    );
    assert!(
        stdout.contains("shared ledger    redis://valkey:6379/0"),
        "{stdout}"
    );
    assert!(!stdout.contains("state file       "), "{stdout}");
    // `render` reads a state file, which a shared ledger does not have: it says so.
    let (status, _, stderr) = run(cwd.path(), &["render", "--config", ha], &[]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is in Redis (redis://valkey:6379/0)"),
        "{stderr}"
    );
}
