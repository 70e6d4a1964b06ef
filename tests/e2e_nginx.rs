//! End to end through real nginx: the templates under `deploy/nginx/templates`, filled as the
//! official image would fill them, in front of the real gatekeeper. Each flow runs on its own
//! stack (see `common::proxies`); the same flows run through Caddy in `e2e_caddy.rs`.

mod common;

use common::proxies::{self, Proxy, flows};

const PROXY: Proxy = Proxy::Nginx;

#[test]
fn phone_with_certificate_reaches_what_its_source_unlocks() {
    flows::phone_with_certificate_reaches_what_its_source_unlocks(PROXY);
}

#[test]
fn certificate_subject_is_the_identity_and_a_rule_narrows_it() {
    flows::certificate_subject_is_the_identity_and_a_rule_narrows_it(PROXY);
}

#[test]
fn stranger_is_refused_whatever_it_claims() {
    flows::stranger_is_refused_whatever_it_claims(PROXY);
}

#[test]
fn client_without_a_valid_certificate_is_refused_and_never_granted() {
    flows::client_without_a_valid_certificate_is_refused_and_never_granted(PROXY);
}

#[test]
fn share_link_opens_only_the_sharing_app() {
    flows::share_link_opens_only_the_sharing_app(PROXY);
}

#[test]
fn invalid_share_link_is_refused_and_grants_nothing() {
    flows::invalid_share_link_is_refused_and_grants_nothing(PROXY);
}

#[test]
fn share_check_503_and_429_reach_the_client() {
    flows::share_check_503_and_429_reach_the_client(PROXY);
}

#[test]
fn access_expires_after_idle_ttl() {
    flows::access_expires_after_idle_ttl(PROXY);
}

#[test]
fn gatekeeper_restart_keeps_access() {
    flows::gatekeeper_restart_keeps_access(PROXY);
}

/// Every `${VAR}` a template uses is listed in its own header and in the README, so a user
/// knows what to set; nothing else looks like an environment variable to envsubst.
#[test]
fn templates_document_every_variable() {
    let readme = std::fs::read_to_string(proxies::deploy_dir().join("nginx/README.md"))
        .expect("deploy/nginx/README.md");
    for (name, text) in proxies::nginx_templates() {
        let header: String = text
            .lines()
            .take_while(|l| l.starts_with('#') || l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let used = proxies::template_variables(&text);
        assert!(!used.is_empty(), "{name} uses no variable");
        for var in used {
            assert!(
                header.contains(&format!("#   {var} ")),
                "{name} uses ${{{var}}} but its header does not list it"
            );
            assert!(
                readme.contains(&format!("`{var}`")),
                "{name} uses ${{{var}}} but deploy/nginx/README.md does not document it"
            );
        }
    }
}
