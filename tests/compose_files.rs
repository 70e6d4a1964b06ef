//! The compose files users copy, read the way Docker Compose reads them (`docker-compose config`,
//! Debian's docker-compose v1; the files are written for Compose v2 too): they parse without an
//! interpolation error, every router that mirrors to gatekeeper requires a client certificate, no
//! gatekeeper endpoint gets a router of its own, and gatekeeper trusts exactly the proxies'
//! fixed addresses. (Issue 13, items 1, 3 and 4.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::proxies::{deploy_dir, tool};
use serde_json::Value;

const COMPOSE_FILES: &[&str] = &["compose.yaml", "compose.ha.yaml"];

/// `docker-compose -f FILE config` (Compose v1), parsed; fails on any warning or error it prints.
fn config(file: &str) -> Value {
    let mut v1 = Command::new(tool("docker-compose", "apt-get install -y docker-compose"));
    v1.arg("--no-ansi");
    read_config(v1, "docker-compose", file)
}

/// `docker compose -f FILE config` (Compose v2), parsed; fails on any warning or error it prints.
fn config_v2(file: &str) -> Value {
    let mut v2 = Command::new(tool("docker", "apt-get install -y docker.io"));
    v2.arg("compose");
    read_config(v2, "docker compose (.ci/run installs Compose v2)", file)
}

/// `COMPOSE -f FILE config` run in deploy/, parsed; fails on any warning or error it prints.
fn read_config(mut compose: Command, what: &str, file: &str) -> Value {
    let out = compose
        .args(["-f", file, "config"])
        .current_dir(deploy_dir())
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} config refused {file}:\n{stderr}"
    );
    assert!(
        !stderr.to_lowercase().contains("warn") && !stderr.contains("ERROR"),
        "{what} config complained about {file}:\n{stderr}"
    );
    yaml(&String::from_utf8_lossy(&out.stdout))
}

fn yaml(text: &str) -> Value {
    use figment::providers::{Format, Yaml};
    figment::Figment::from(Yaml::string(text))
        .extract()
        .unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
}

/// Every label of every service, as (service, key, value).
fn labels(config: &Value) -> Vec<(String, String, String)> {
    let mut all = Vec::new();
    for (name, service) in config["services"].as_object().expect("services") {
        let Some(labels) = service["labels"].as_object() else {
            continue;
        };
        for (k, v) in labels {
            all.push((
                name.clone(),
                k.clone(),
                v.as_str().unwrap_or("").to_string(),
            ));
        }
    }
    all
}

/// The policy file mounted into the gatekeeper service.
fn mounted_policy(config: &Value) -> PathBuf {
    let volumes = config["services"]["gatekeeper"]["volumes"]
        .as_array()
        .expect("gatekeeper volumes");
    volumes
        .iter()
        .filter_map(Value::as_str)
        .find_map(|v| {
            v.split_once(":/app/gatekeeper.yaml")
                .map(|(host, _)| PathBuf::from(host))
        })
        .expect("a policy mounted at /app/gatekeeper.yaml")
}

#[test]
fn every_compose_file_parses_without_an_interpolation_error() {
    for file in COMPOSE_FILES {
        let config = config(file);
        assert!(config["services"]["gatekeeper"].is_object(), "{file}");
    }
}

/// Compose v2 (`docker compose`, what users run) reads them without a warning too, and sees the
/// same labels as v1. (tests/docker.rs runs compose.yaml with v2 and Traefik routes by them.)
#[test]
fn compose_v2_reads_every_compose_file_as_v1_does() {
    for file in COMPOSE_FILES {
        let mut v2_labels = labels(&config_v2(file));
        let mut v1_labels = labels(&config(file));
        v2_labels.sort();
        v1_labels.sort();
        assert_eq!(v2_labels, v1_labels, "{file}");
    }
}

#[test]
fn every_router_that_mirrors_to_gatekeeper_requires_a_client_certificate() {
    // The mirroring services live in deploy/traefik/dynamic/mirror.yml.
    let mirror =
        yaml(&std::fs::read_to_string(deploy_dir().join("traefik/dynamic/mirror.yml")).unwrap());
    let mirroring: Vec<String> = mirror["http"]["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| s["mirroring"].is_object())
        .map(|(name, _)| format!("{name}@file"))
        .collect();
    assert!(!mirroring.is_empty());
    let mtls =
        yaml(&std::fs::read_to_string(deploy_dir().join("traefik/dynamic/mtls.yml")).unwrap());
    assert_eq!(
        mtls["tls"]["options"]["mtls"]["clientAuth"]["clientAuthType"],
        "RequireAndVerifyClientCert"
    );
    for file in COMPOSE_FILES {
        let config = config(file);
        let labels = labels(&config);
        let mut mirrored_routers = 0;
        for (service, key, value) in &labels {
            let Some(router) = key
                .strip_prefix("traefik.http.routers.")
                .and_then(|r| r.strip_suffix(".service"))
            else {
                continue;
            };
            if !mirroring.contains(value) {
                continue;
            }
            mirrored_routers += 1;
            let options = format!("traefik.http.routers.{router}.tls.options");
            assert!(
                labels
                    .iter()
                    .any(|(s, k, v)| s == service && *k == options && v == "mtls@file"),
                "{file}: router `{router}` of `{service}` mirrors to gatekeeper through {value} \
                 without `{options}=mtls@file`: anyone reaching it would be granted"
            );
        }
        assert!(mirrored_routers > 0, "{file} mirrors nothing to gatekeeper");
        // The TLS options and the CA they read are mounted into every Traefik.
        for (name, service) in config["services"].as_object().unwrap() {
            if !name.starts_with("traefik") {
                continue;
            }
            let volumes: Vec<&str> = service["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                volumes.iter().any(|v| v.contains(":/etc/traefik/certs")),
                "{file}: {name} has no /etc/traefik/certs: {volumes:?}"
            );
            assert!(
                volumes
                    .iter()
                    .any(|v| v.ends_with(":/etc/traefik/dynamic:ro")
                        || v.contains("mtls.yml:/etc/traefik/dynamic/mtls.yml")),
                "{file}: {name} does not load mtls.yml: {volumes:?}"
            );
        }
    }
}

#[test]
fn no_gatekeeper_endpoint_gets_a_router_of_its_own() {
    for file in COMPOSE_FILES {
        let config = config(file);
        let gatekeeper = &config["services"]["gatekeeper"];
        let enabled = gatekeeper["labels"]["traefik.enable"].as_str() == Some("true");
        assert!(
            !enabled,
            "{file}: traefik.enable on the gatekeeper container gives it a public router \
             (/traefik/dynamic.json, /allow)"
        );
        // Routers of other containers never send traffic to gatekeeper's service either.
        for (service, key, value) in labels(&config) {
            if key.starts_with("traefik.http.routers.") && key.ends_with(".service") {
                assert!(
                    !value.contains("gatekeeper"),
                    "{file}: {service} routes {key}={value}"
                );
            }
        }
    }
}

#[test]
fn gatekeeper_trusts_exactly_the_proxies_fixed_addresses_and_never_grants_the_gateway() {
    for file in COMPOSE_FILES {
        let config = config(file);
        let mut proxies: Vec<String> = config["services"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(name, _)| name.starts_with("traefik"))
            .map(|(name, s)| {
                let address = s["networks"]["default"]["ipv4_address"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{file}: {name} has no fixed address"));
                format!("{address}/32")
            })
            .collect();
        proxies.sort();
        let policy = mounted_policy(&config);
        let policy = yaml(&std::fs::read_to_string(Path::new(&policy)).unwrap());
        let mut trusted: Vec<String> = policy["trusted_proxies"]
            .as_array()
            .expect("trusted_proxies set")
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        trusted.sort();
        assert_eq!(trusted, proxies, "{file}");
        // And the addresses are inside the network's fixed subnet.
        let subnet = config["networks"]["default"]["ipam"]["config"][0]["subnet"]
            .as_str()
            .expect("a fixed subnet");
        let subnet: ipnet::IpNet = subnet.parse().unwrap();
        for p in &proxies {
            let net: ipnet::IpNet = p.parse().unwrap();
            assert!(subnet.contains(&net), "{file}: {p} outside {subnet}");
        }
        // The network's gateway, which every client Docker's userland proxy forwards looks like,
        // is fixed and never granted; and the fixed addresses are outside the range Docker
        // hands out, so no other container can take them first.
        let ipam = &config["networks"]["default"]["ipam"]["config"][0];
        let gateway = ipam["gateway"].as_str().expect("a fixed gateway");
        let never: Vec<&str> = policy["never_grant"]
            .as_array()
            .expect("never_grant set")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(never, [format!("{gateway}/32")], "{file}");
        let dynamic: ipnet::IpNet = ipam["ip_range"]
            .as_str()
            .expect("an ip_range for dynamic addresses")
            .parse()
            .unwrap();
        for fixed in proxies.iter().map(String::as_str).chain([never[0]]) {
            let net: ipnet::IpNet = fixed.parse().unwrap();
            assert!(
                subnet.contains(&dynamic) && !dynamic.contains(&net),
                "{file}: {fixed} is inside the dynamic range {dynamic}"
            );
        }
    }
}
