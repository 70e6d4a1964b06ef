//! Traefik conformance without Traefik: what gatekeeper renders for the file provider (YAML) and
//! the HTTP provider (JSON) is validated against Traefik's published JSON schemas, which the
//! project keeps beside the repository in `../shared/traefik/`.

use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Format, Yaml};
use gatekeeper::ledger::Ledger;
use gatekeeper::policy::{Policy, from_yaml_str};
use gatekeeper::sinks::traefik_file::{render, render_json};
use serde_json::Value;

fn schema_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/traefik");
    if dir.is_dir() {
        Some(dir)
    } else {
        // Visible in the test output and repeated by .ci/run: nothing was checked.
        println!(
            "note: {} does not exist; Traefik schema conformance was NOT checked",
            dir.display()
        );
        None
    }
}

fn validator(dir: &std::path::Path, version: u8) -> jsonschema::Validator {
    let path = dir.join(format!("traefik-v{version}-file-provider.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema: Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn errors(v: &jsonschema::Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// A policy with every shape the renderer produces: IPv4 and IPv6 grants, a service with its own
/// always_allow, a service nobody may reach yet (the sentinel), and an ipStrategy.
fn policy(version: u8, strategy: &str) -> Policy {
    let yaml = format!(
        "traefik: {{ file: ./x.yml, version: {version}, middleware_prefix: gk-{strategy} }}\n\
         always_allow: [192.168.0.0/16]\n\
         services:\n  immich: {{}}\n  jellyfin: {{ always_allow: [203.0.113.7] }}\n  empty: {{}}\n\
         sources:\n  ha: {{ kind: mirror, hosts: [ha.example.com], unlocks: [immich, jellyfin], max_ips: 5 }}\n"
    );
    let mut p = from_yaml_str(&yaml, "schema test").unwrap();
    // `empty` must really be empty: no global always_allow for it would exist in a real policy
    // that wants a closed service, so drop the global ranges here.
    p.always_allow.clear();
    p
}

fn snapshot_of(p: &Policy) -> gatekeeper::ledger::Snapshot {
    let mut l = Ledger::new(p);
    l.record("ha", "198.51.100.7/32".parse().unwrap(), 1, None);
    l.record("ha", "2001:db8:1:2::/64".parse().unwrap(), 2, None);
    l.snapshot(p)
}

fn yaml_to_json(text: &str) -> Value {
    Figment::from(Yaml::string(text))
        .extract::<Value>()
        .expect("rendered YAML parses")
}

#[test]
fn rendered_file_and_http_provider_json_validate_against_traefiks_schemas() {
    let Some(dir) = schema_dir() else { return };
    for version in [2u8, 3] {
        let v = validator(&dir, version);
        for strategy in ["", "depth", "excluded"] {
            let mut p = policy(version, strategy);
            p.traefik.ip_strategy = match strategy {
                "depth" => Some(gatekeeper::policy::IpStrategy {
                    depth: Some(1),
                    ..Default::default()
                }),
                "excluded" => Some(gatekeeper::policy::IpStrategy {
                    excluded_ips: vec!["10.0.0.0/8".parse().unwrap()],
                    ..Default::default()
                }),
                _ => None,
            };
            let snapshot = snapshot_of(&p);
            let file = yaml_to_json(&render(&snapshot, &p.traefik, &p.origin));
            let json = render_json(&snapshot, &p.traefik);
            assert_eq!(
                file, json,
                "the file and the HTTP provider must say the same"
            );
            let errs = errors(&v, &file);
            assert!(
                errs.is_empty(),
                "v{version} {strategy}: {errs:#?}\n{file:#}"
            );
            // The closed service really is there, with the sentinel.
            let kind = if version == 2 {
                "ipWhiteList"
            } else {
                "ipAllowList"
            };
            let empty = &file["http"]["middlewares"][format!("gk-{strategy}empty")][kind];
            assert_eq!(
                empty["sourceRange"],
                serde_json::json!(["0.0.0.0/32"]),
                "{file:#}"
            );
        }
    }
}

#[test]
fn the_golden_files_validate_too() {
    let Some(dir) = schema_dir() else { return };
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    for version in [2u8, 3] {
        let text = std::fs::read_to_string(golden.join(format!("traefik_v{version}.yml"))).unwrap();
        let mut doc = yaml_to_json(&text);
        // ipv6Subnet (Traefik 3.1) is newer than the published v3 schema; it is the one key the
        // schema does not know, so it is taken out before validating the rest.
        if let Some(mws) = doc["http"]["middlewares"].as_object_mut() {
            for mw in mws.values_mut() {
                if let Some(s) = mw
                    .pointer_mut("/ipAllowList/ipStrategy")
                    .and_then(Value::as_object_mut)
                {
                    s.remove("ipv6Subnet");
                }
            }
        }
        let errs = errors(&validator(&dir, version), &doc);
        assert!(errs.is_empty(), "golden v{version}: {errs:#?}");
    }
}

#[test]
fn the_validator_rejects_what_traefik_would_reject() {
    // A control: without it, a validator that accepts everything would pass the tests above.
    let Some(dir) = schema_dir() else { return };
    let p = policy(3, "");
    let good = render_json(&snapshot_of(&p), &p.traefik);
    let v = validator(&dir, 3);
    assert!(errors(&v, &good).is_empty());
    let mut typo = good.clone();
    let mw = typo["http"]["middlewares"]["gk-immich"]["ipAllowList"]
        .as_object_mut()
        .unwrap();
    let range = mw.remove("sourceRange").unwrap();
    mw.insert("sourceRanges".into(), range);
    assert!(
        !errors(&v, &typo).is_empty(),
        "a misspelled key must be refused"
    );
    let mut wrong_type = good;
    wrong_type["http"]["middlewares"]["gk-immich"]["ipAllowList"]["sourceRange"] =
        serde_json::json!("198.51.100.7/32");
    assert!(
        !errors(&v, &wrong_type).is_empty(),
        "a string instead of a list must be refused"
    );
}

#[test]
fn the_deploy_kits_traefik_files_validate() {
    let Some(dir) = schema_dir() else { return };
    let v = validator(&dir, 3);
    let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/traefik/dynamic");
    let mut checked = 0;
    for entry in std::fs::read_dir(&deploy).unwrap() {
        let path = entry.unwrap().path();
        let mut doc = yaml_to_json(&std::fs::read_to_string(&path).unwrap());
        // mirrorBody (Traefik 3.2) is newer than the published v3 schema.
        if let Some(services) = doc
            .pointer_mut("/http/services")
            .and_then(Value::as_object_mut)
        {
            for s in services.values_mut() {
                if let Some(m) = s.get_mut("mirroring").and_then(Value::as_object_mut) {
                    m.remove("mirrorBody");
                }
            }
        }
        let errs = errors(&v, &doc);
        assert!(errs.is_empty(), "{}: {errs:#?}", path.display());
        checked += 1;
    }
    assert!(checked >= 2, "expected the mtls and mirror examples");
}
